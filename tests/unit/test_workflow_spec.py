"""Workflow specs: parsing and the validation that needs no instance."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dspy_infra.workflows import InvalidWorkflow, Step, WorkflowSpec
from dspy_infra.workflows.spec import ReferenceError_, resolve


def spec(**steps: dict[str, Any]) -> WorkflowSpec:
    return WorkflowSpec.from_mapping({"name": "wf", "steps": steps})


def test_a_cycle_is_refused_with_its_whole_path() -> None:
    with pytest.raises(InvalidWorkflow, match=r"workflow 'wf': cycle: a -> c -> b -> a"):
        spec(
            a={"handler": "h", "depends_on": ["c"]},
            b={"handler": "h", "depends_on": ["a"]},
            c={"handler": "h", "depends_on": ["b"]},
        )


def test_unknown_steps_and_references_are_named() -> None:
    with pytest.raises(InvalidWorkflow, match=r"step 'b': depends_on: unknown step 'x'"):
        spec(a={"handler": "h"}, b={"handler": "h", "depends_on": ["x"]})
    with pytest.raises(InvalidWorkflow, match=r"refers to step 'a', which is not among its"):
        spec(a={"handler": "h"}, b={"handler": "h", "payload": "${steps.a.result}"})
    # Not "add it to depends_on": that would only give another error.
    with pytest.raises(
        InvalidWorkflow, match=r"refers to step 'zz', which this workflow does not have \(its "
    ):
        spec(a={"handler": "h"}, b={"handler": "h", "payload": "${steps.zz.result}"})
    with pytest.raises(InvalidWorkflow, match=r"step 'b': \$\{steps.b.result\} is its own result"):
        spec(a={"handler": "h"}, b={"handler": "h", "payload": "${steps.b.result}"})
    for empty in ("${steps..result}", "${inputs.x.}", "${inputs..x}"):
        with pytest.raises(InvalidWorkflow, match=r": an empty name between dots"):
            spec(a={"handler": "h", "payload": empty})
    with pytest.raises(InvalidWorkflow, match=r"only meaningful in a fan_out step"):
        spec(a={"handler": "h", "payload": ["${item}"]})
    with pytest.raises(InvalidWorkflow, match=r"unknown reference"):
        spec(a={"handler": "h", "payload": "${nothing.here}"})
    with pytest.raises(InvalidWorkflow, match=r"unknown keys \['retries'\]"):
        spec(a={"handler": "h", "retries": 3})
    with pytest.raises(InvalidWorkflow, match=r"declared twice"):
        WorkflowSpec(name="wf", steps=[Step(name="a", handler="h"), Step(name="a", handler="h")])
    with pytest.raises(InvalidWorkflow, match=r"fan_out must be a reference"):
        spec(a={"handler": "h", "fan_out": "[1, 2]"})
    # The item is what a fan-out makes, not what it is made from.
    for made in ("${item}", "${ index }", "${item.list}"):
        with pytest.raises(InvalidWorkflow, match=r"step 'a': fan_out \$\{.*\}: \$\{item\} and"):
            spec(a={"handler": "h", "fan_out": made, "payload": "${item}"})


def test_a_list_of_names_that_is_not_one_is_named_with_its_key() -> None:
    # Both said "'int' object is not iterable", naming neither key.
    for key in ("depends_on", "needs"):
        with pytest.raises(InvalidWorkflow) as caught:
            spec(a={"handler": "h"}, b={"handler": "h", key: 5})
        assert str(caught.value) == f"workflow 'wf': step 'b': {key} must be a list of names, got 5"
        with pytest.raises(TypeError, match=f"^{key} must be a list of names, got 5$"):
            Step(name="b", handler="h", **{key: 5})  # type: ignore[arg-type]


def test_a_reference_through_an_ancestor_is_fine_and_the_order_follows_dependencies() -> None:
    s = spec(
        last={"handler": "h", "depends_on": ["mid"], "payload": {"x": "${steps.first.result}"}},
        mid={"handler": "h", "depends_on": "first"},
        first={"handler": "h", "payload": "${inputs.size}"},
    )
    assert s.order() == ["first", "mid", "last"]
    assert s.inputs() == {"size"}


def test_the_id_depends_on_the_content_only() -> None:
    a = spec(x={"handler": "h", "payload": {"k": 1}})
    b = WorkflowSpec(name="wf", steps=[Step(name="x", handler="h", payload={"k": 1})])
    c = spec(x={"handler": "h", "payload": {"k": 2}})
    assert a.workflow_id() == b.workflow_id() != c.workflow_id()
    assert a.workflow_id().startswith("wf-")


_JSON_LEAVES = st.none() | st.booleans() | st.integers() | st.text(max_size=5)


@settings(max_examples=200)
@given(
    payload=st.recursive(
        _JSON_LEAVES,
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.lists(inner, max_size=3).map(tuple)
            | st.dictionaries(st.text(max_size=3), inner, max_size=3)
        ),
        max_leaves=8,
    )
)
def test_a_spec_read_back_from_its_mapping_has_the_same_payload(payload: Any) -> None:
    # The engine keeps (and a restart reads) the spec as its mapping: an empty
    # tuple payload was left out of it, and the step's task got None, not [].
    step = Step(name="x", handler="h", payload=payload)
    mapping = json.loads(json.dumps(WorkflowSpec(name="wf", steps=[step]).to_mapping()))
    again = WorkflowSpec.from_mapping(mapping).step("x")
    assert json.dumps(again.payload) == json.dumps(payload)


def test_references_resolve_whole_strings_only() -> None:
    context = {"inputs": {"n": 3, "xs": [1, 2]}, "steps": {"a": {"result": {"k": "v"}}}}
    payload = {
        "n": "${inputs.n}",
        "second": "${inputs.xs.1}",
        "k": "${steps.a.result.k}",
        "text": "size-${inputs.n}",
        "literal": "$${inputs.n}",
    }
    assert resolve(payload, context) == {
        "n": 3,
        "second": 2,
        "k": "v",
        "text": "size-${inputs.n}",
        "literal": "${inputs.n}",
    }
    with pytest.raises(ReferenceError_, match=r"nothing at 'inputs\.missing'"):
        resolve("${inputs.missing}", context)


@given(st.text())
def test_a_string_that_is_no_reference_nor_an_escaped_one_is_left_as_it_is(tail: str) -> None:
    # "$${x}" is the escape of the reference "${x}", and only that: a string
    # that merely begins with "$${" (a shell or compose snippet, "$${HOME}/bin")
    # lost its first "$".
    for text in (tail, "$" + tail, "$${" + tail, "$${x}" + tail):
        if re.fullmatch(r"\$\$?\{[^{}]+\}", text):
            continue
        assert resolve({"s": [text]}, {}) == {"s": [text]}


def test_a_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "wf.toml"
    path.write_text(
        """
name = "gepa"

[steps.prepare]
handler = "prepare"
payload = { dataset = "${inputs.dataset}" }

[steps.evaluate]
handler = "evaluate"
depends_on = ["prepare"]
fan_out = "${steps.prepare.result.candidates}"
payload = { candidate = "${item}", index = "${index}" }
max_attempts = 3
timeout = 600.0
"""
    )
    s = WorkflowSpec.from_file(path)
    assert [step.name for step in s.steps] == ["prepare", "evaluate"]
    assert s.step("evaluate").max_attempts == 3
    assert s.step("evaluate").depends_on == ("prepare",)
    path.write_text('name = "x"\n[steps.a]\nhandler = "h"\ndepends_on = ["a"]\n')
    with pytest.raises(
        InvalidWorkflow, match=r"wf\.toml: workflow 'x': step 'a' depends on itself"
    ):
        WorkflowSpec.from_file(path)


def test_a_chain_longer_than_the_recursion_limit_is_validated_and_ordered() -> None:
    # Declared last step first, so that every walk goes the chain's whole length.
    n = 5000
    steps = {
        f"s{i}": {"handler": "h", "depends_on": [f"s{i - 1}"] if i else []}
        for i in reversed(range(n))
    }
    steps[f"s{n - 1}"]["payload"] = "${steps.s0.result}"  # an ancestor at the far end
    chain = spec(**steps)
    assert chain.order() == [f"s{i}" for i in range(n)]
    # The same chain closed into a cycle, and a reference to a step not upstream.
    steps["s0"]["depends_on"] = [f"s{n - 1}"]
    with pytest.raises(InvalidWorkflow, match=rf"cycle: s{n - 1} -> s{n - 2} -> "):
        spec(**steps)
    steps["s0"]["depends_on"] = []
    steps["s0"]["payload"] = f"${{steps.s{n - 1}.result}}"
    with pytest.raises(InvalidWorkflow, match=rf"refers to step 's{n - 1}', which is not among"):
        spec(**steps)


def test_references_beyond_the_dependencies_are_checked_in_linear_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each step of a chain refers to its first: finding the ancestors of each
    # step alone walked back to it from every step, N * N / 2 steps (4.7 s
    # for 10,000, at create() and at every instance start). The work is
    # counted in reads of a step's depends_on, which any walk does.
    reads = 0
    depends_on = Step.__dict__["depends_on"]

    def counted(step: Step) -> tuple[str, ...]:
        nonlocal reads
        reads += 1
        return depends_on.__get__(step, Step)  # type: ignore[no-any-return]

    n = 5000
    steps: dict[str, dict[str, Any]] = {"s0": {"handler": "h"}}
    for i in range(1, n):
        steps[f"s{i}"] = {
            "handler": "h",
            "depends_on": [f"s{i - 1}"],
            "payload": {"first": "${steps.s0.result}", "before": f"${{steps.s{i // 2}.result}}"},
        }
    with monkeypatch.context() as patched:
        patched.setattr(Step, "depends_on", property(counted, depends_on.__set__))
        spec(**steps)
    assert reads < 20 * n, reads  # the walks from each step read it N * N / 2 times


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_a_reference_to_a_step_is_valid_exactly_when_that_step_is_upstream(
    data: st.DataObject,
) -> None:
    n = data.draw(st.integers(2, 8))
    deps = [
        sorted(data.draw(st.sets(st.integers(0, i - 1), max_size=2))) if i else [] for i in range(n)
    ]
    step, target = data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, n - 1))
    upstream: set[int] = set()
    todo = list(deps[step])
    while todo:
        if (i := todo.pop()) not in upstream:
            upstream.add(i)
            todo.extend(deps[i])
    steps: dict[str, dict[str, Any]] = {
        f"s{i}": {"handler": "h", "depends_on": [f"s{d}" for d in deps[i]]} for i in range(n)
    }
    # Declared in any order: the check follows the dependencies, not the table.
    order = data.draw(st.permutations(range(n)))
    steps[f"s{step}"]["payload"] = [f"${{steps.s{target}.result}}", "${nothing}"]
    with pytest.raises(InvalidWorkflow) as raised:
        spec(**{f"s{i}": steps[f"s{i}"] for i in order})
    # The first bad reference of the step is the one named.
    if target in upstream:
        assert "${nothing}: unknown reference" in str(raised.value)
    elif target == step:
        assert f"${{steps.s{target}.result}} is its own result" in str(raised.value)
    else:
        assert f"refers to step 's{target}', which is not among" in str(raised.value)


def test_payloads_that_json_cannot_write_are_invalid_workflow(tmp_path: Path) -> None:
    deep: Any = "${inputs.x}"
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(InvalidWorkflow, match=r"step 'a': the payload is not JSON-compatible"):
        spec(a={"handler": "h", "payload": deep})
    # Keys of mixed types: json writes them, but cannot sort them for the id.
    with pytest.raises(InvalidWorkflow, match=r"step 'a': the payload is not JSON-compatible"):
        spec(a={"handler": "h", "payload": {1: "one", "two": 2}})
    toml = tmp_path / "deep.toml"
    toml.write_text('name = "deep"\n[steps.a]\nhandler = "h"\npayload = ' + "[" * 5000 + "]" * 5000)
    with pytest.raises(InvalidWorkflow, match=r"deep\.toml: "):
        WorkflowSpec.from_file(toml)
    # Deep, but not too deep for JSON: fine, and its references are found.
    deep = "${inputs.x}"
    for _ in range(500):
        deep = {"k": deep}
    assert spec(a={"handler": "h", "payload": deep}).inputs() == {"x"}
