"""Pipeline text and JSON forms, PanguPass options/tags/counts, and the registry."""

from __future__ import annotations

import json

import onnx_ir as ir
import pytest

from pangu_light.core.errors import PanguLightError
from pangu_light.passes.infra import registry
from pangu_light.passes.infra.base import Option, PanguPass
from pangu_light.passes.infra.pipeline import PassSpec, Pipeline

CANONICAL = [
    "slnp",
    "drop-layers{layers=[3,7]},slice-hidden{keep_first=448},slnp",
    "slice-hidden{keep=448},prune-heads{per_group=2},drop-layers{n=6,clap=true},slnp",
    "a{x=[[1,2],[3]],y=[[0.5,1e-05],[]],z=[]}",
    "a{flag=false,ratio=0.75,neg=-3,negf=-2.5,big=1e+20}",
    "a{mode=geometric,names=[q_proj,o_proj],path=cache/x.npz}",
    'a{s="3",t="true",u="two words",v="a,b"}',
    "x2-y{a=1},x2-y{a=2}",
]


@pytest.mark.parametrize("text", CANONICAL)
def test_canonical_text_prints_back_identically(text):
    pipeline = Pipeline.parse(text)
    assert str(pipeline) == text
    assert Pipeline.parse(str(pipeline)) == pipeline


@pytest.mark.parametrize("text", CANONICAL)
def test_json_round_trip(text):
    pipeline = Pipeline.parse(text)
    as_json = json.loads(json.dumps(pipeline.to_json()))
    assert Pipeline.from_json(as_json) == pipeline
    assert str(Pipeline.from_json(as_json)) == text


def test_parsed_values_have_the_right_types():
    pipeline = Pipeline.parse('a{i=3,f=3.0,e=1e-5,b=true,s=foo,q="7",l=[1,[2.5,false]]}')
    options = pipeline[0].options
    assert options == {"i": 3, "f": 3.0, "e": 1e-5, "b": True, "s": "foo", "q": "7", "l": [1, [2.5, False]]}
    assert [type(options[k]) for k in "ifebsq"] == [int, float, float, bool, str, str]
    assert type(options["l"][1][1]) is bool
    assert pipeline.to_json() == [{"pass": "a", **options}]


def test_whitespace_is_accepted_and_normalised():
    text = "  drop-layers { layers = [ 3 , 7 ] } ,\n slice-hidden{ keep_first=448 } , slnp {}  "
    assert str(Pipeline.parse(text)) == "drop-layers{layers=[3,7]},slice-hidden{keep_first=448},slnp"


def test_non_canonical_numbers_print_canonically():
    assert str(Pipeline.parse("a{x=1E-5,y=.5,z=+4,w=2.}")) == "a{x=1e-05,y=0.5,z=4,w=2.0}"


def test_from_json_and_to_json():
    items = [{"pass": "drop-layers", "layers": [3, 7], "clap": True}, {"pass": "slnp"}]
    pipeline = Pipeline.from_json(items)
    assert str(pipeline) == "drop-layers{layers=[3,7],clap=true},slnp"
    assert pipeline.to_json() == items
    assert pipeline == Pipeline([PassSpec("drop-layers", {"layers": [3, 7], "clap": True}), PassSpec("slnp")])


@pytest.mark.parametrize(
    "text, message",
    [
        ("a{x=1", "at position 5 expected ',' or '}' after an option value, found end of text"),
        ("a{x=1,y=2", "at position 9 expected ',' or '}' after an option value, found end of text"),
        ("a{x}", "at position 3 expected '=' after option name 'x', found '}'"),
        ("a{x 1}", "at position 4 expected '=' after option name 'x', found '1'"),
        ("", "at position 0 expected a pass name (kebab-case, like 'slice-hidden'), found end of text"),
        ("{x=1}", "at position 0 expected a pass name (kebab-case, like 'slice-hidden'), found '{'"),
        ("a,", "at position 2 expected a pass name (kebab-case, like 'slice-hidden'), found end of text"),
        ("a,,b", "at position 2 expected a pass name (kebab-case, like 'slice-hidden'), found ','"),
        ("a{x=1,}", "at position 6 expected an option name (like 'keep_first'), found '}'"),
        ("a{x=[1,2}", "at position 8 expected ',' or ']' in a list, found '}'"),
        ("a{x=}", "at position 4 expected a value (number, true/false, word, or [list]), found '}'"),
        ("a b", "at position 2 expected ',' before the next pass, or the end of the pipeline, found 'b'"),
        ("slice_hidden", "at position 5 expected '{', ',' or the end after pass name 'slice'"),
        ("Slice", "at position 0 expected a pass name (kebab-case, like 'slice-hidden'), found 'S'"),
        ('a{x="abc}', "at position 4 expected a closing '\"' for a quoted string"),
        ("a{x=1,x=2}", "at position 6 option 'x' of pass a is given twice; give each option once"),
    ],
)
def test_bad_text_names_position_and_expectation(text, message):
    with pytest.raises(PanguLightError) as info:
        Pipeline.parse(text)
    assert str(info.value).startswith(f"bad pipeline {text!r}: {message}")
    assert "\n" not in str(info.value)


def test_bad_json():
    with pytest.raises(PanguLightError, match=r'pipeline entry 1 \(\{\'layers\': \[3\]\}\) has no "pass" key'):
        Pipeline.from_json([{"pass": "slnp"}, {"layers": [3]}])
    with pytest.raises(PanguLightError, match=r"pass name 'Drop_Layers' is not kebab-case"):
        Pipeline.from_json([{"pass": "Drop_Layers"}])
    with pytest.raises(PanguLightError, match=r"pass a option x: value \{'k': 1\} of type dict is not allowed"):
        Pipeline.from_json([{"pass": "a", "x": {"k": 1}}])


def test_unknown_pass_name_when_built():
    spec = Pipeline.parse("slice-hiden{keep_first=448}")[0]
    with pytest.raises(PanguLightError) as info:
        registry.build_pass(spec)
    message = str(info.value)
    assert message.startswith("unknown pass 'slice-hiden'; available passes: ")
    assert set(message.split(": ", 1)[1].split(", ")) == set(registry.available_passes())
    assert "drop-layers" in message and "slice-hidden" in message


# -- PanguPass -------------------------------------------------------------------------


class ToyPass(PanguPass):
    name = "toy"
    options_schema = {
        "layers": list[int],
        "ratio": Option(float, default=0.5),
        "clap": Option(bool, default=False),
        "mode": Option(str, default="plain"),
    }

    def call(self, model):
        return ir.passes.PassResult(model, modified=False)


VALID = (
    "valid options: layers (list[int]), ratio (float, default 0.5), clap (bool, default false), "
    "mode (str, default plain)"
)


def test_options_are_resolved_with_defaults():
    pass_ = ToyPass({"layers": [3, 7], "ratio": 1})
    assert pass_.options == {"layers": [3, 7], "ratio": 1.0, "clap": False, "mode": "plain"}
    assert type(pass_.options["ratio"]) is float


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(PanguLightError) as info:
        ToyPass({"layers": [1], "n": 6})
    assert str(info.value) == f"pass toy: unknown option 'n'; {VALID}"


def test_missing_required_option():
    with pytest.raises(PanguLightError) as info:
        ToyPass({})
    assert str(info.value) == f"pass toy: option 'layers' is required; {VALID}"


@pytest.mark.parametrize(
    "options, problem",
    [
        ({"layers": 3}, "option layers=3 is invalid (expected a list, got int)"),
        ({"layers": [3, 2.5]}, "option layers=[3,2.5] is invalid (expected an integer, got float)"),
        ({"layers": [True]}, "option layers=[true] is invalid (expected an integer, got bool)"),
        ({"layers": [], "clap": 1}, "option clap=1 is invalid (expected true or false, got int)"),
        ({"layers": [], "ratio": "half"}, "option ratio=half is invalid (expected a number, got str)"),
        ({"layers": [], "mode": 3}, "option mode=3 is invalid (expected a string, got int)"),
    ],
)
def test_wrong_types_are_errors_naming_the_valid_options(options, problem):
    with pytest.raises(PanguLightError) as info:
        ToyPass(options)
    assert str(info.value) == f"pass toy: {problem}; {VALID}"


def test_validator_options():
    def positive_int(value):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"expected a positive integer, got {value!r}")
        return value

    class KeepPass(ToyPass):
        name = "keep"
        options_schema = {"keep": positive_int}

    assert KeepPass({"keep": 448}).options == {"keep": 448}
    with pytest.raises(PanguLightError) as info:
        KeepPass({"keep": -1})
    assert str(info.value) == (
        "pass keep: option keep=-1 is invalid (expected a positive integer, got -1); "
        "valid options: keep (positive_int)"
    )


def test_tag_appends_other_passes_once_and_count_accumulates():
    value = ir.Value(name="w")
    node = ir.node("Identity", [value])
    class OtherPass(ToyPass):
        name = "other"

    first, second = ToyPass({"layers": []}), OtherPass({"layers": []})
    first.tag(value)
    first.tag(value)
    second.tag(value)
    first.tag(node)
    assert value.metadata_props["pangu_light.pass"] == "toy,other"
    assert node.metadata_props["pangu_light.pass"] == "toy"
    first.count("layers_removed", 2)
    first.count("layers_removed", 4)
    first.count("initializers_sliced")
    assert first.stats == {"layers_removed": 6, "initializers_sliced": 1}


def test_pass_without_name_is_rejected():
    class Nameless(PanguPass):
        def call(self, model):
            return ir.passes.PassResult(model, False)

    with pytest.raises(TypeError, match="must set the class attribute 'name'"):
        Nameless()


# -- registry --------------------------------------------------------------------------


def test_registry_resolves_strings_and_checks_names(monkeypatch):
    monkeypatch.setitem(registry.PASSES, "toy", f"{__name__}:ToyPass")
    assert registry.get_pass("toy") is ToyPass
    assert "toy" in registry.available_passes()
    built = registry.build_pass(PassSpec("toy", {"layers": [1]}))
    assert isinstance(built, ToyPass) and built.options["layers"] == [1]

    monkeypatch.setitem(registry.PASSES, "toy-missing", "pangu_light.passes.no_such_module:X")
    with pytest.raises(PanguLightError, match=r"module pangu_light.passes.no_such_module is not installed"):
        registry.get_pass("toy-missing")

    monkeypatch.setitem(registry.PASSES, "wrong-name", f"{__name__}:ToyPass")
    with pytest.raises(TypeError, match=r"points at ToyPass, whose name is 'toy'"):
        registry.get_pass("wrong-name")


def test_registry_lists_the_planned_passes_sorted():
    names = registry.available_passes()
    assert {"drop-layers", "slice-hidden", "fuse-gqa", "pack-qkv", "fuse-norms"} <= set(names)
    for name in names:  # every entry resolves to a pass class of that name
        assert registry.get_pass(name).name == name
    assert names == sorted(names)
