"""fastlora._patterns: module-name patterns whose matching cost is bounded.

Both directions, without timing: every pattern PEFT's docs, PEFT's own tests
and configs in the wild use (and the ones fastlora writes) is accepted; the
classic catastrophic shapes are refused with the reason. Then, with timing but
with margins of orders of magnitude, random patterns that are accepted must
match adversarial names quickly.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastlora._patterns import (
    MAX_DEGREE,
    MAX_NAME_LENGTH,
    UnsafePatternError,
    compile_module_pattern,
    fullmatch_module_name,
    match_pattern_key,
    pattern_problem,
)

# Every one of these must be accepted (and compile to exactly re.compile's pattern).
ACCEPTED = [
    # PEFT's docs (LoraConfig.target_modules help) and constants
    r".*decoder.*(SelfAttention|EncDecAttention).*(q|v)$",
    r".*language_model\..*\.(q_proj|v_proj)",
    # PEFT's tests
    r".*\.embed_tokens",
    r".*\.(q_proj|v_proj)",
    # adapter configs and training scripts in the wild
    r"^(model\.layers\.\d+\.self_attn\.(q|k|v)_proj)$",
    r"model.*\.layers\.\d+\..*",
    r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$",
    r".*language_model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)",
    r".*(language_model|model\.layers).*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
    r".*\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
    r".*\.(in_proj|out_proj|up_proj|down_proj)$",
    r".*\.mlp\.fc\d",
    r".*language_model.*self_attn\.(q|k|v|o)_proj",
    r"(?:.*\.(q_proj|v_proj)|^lm_head$)",  # PEFT's own composition with an embedding name
    r"^(?!.*lm_head).*$",
    r"(?i).*Q_PROJ",
    r"layers\.\d{1,2}\.(mlp|self_attn)\..*",
    r"q_proj",
    r".*",
    # what fastlora's save_adapter writes: escaped full names joined inside one group
    r"^(a\.b|c\.d)$",
    "^(" + "|".join(re.escape(f"model.layers.{i}.self_attn.{p}") for i in range(40) for p in ("q_proj", "v_proj"))
    + ")$",
    r"^(fc|fc2|fc2\.sub)$",
    # delimited repeats: the next iteration's first character ends the inner repeat
    r"(\.\w+)*",
    r"model(\.\w+)*\.q_proj",
    r"(\w+\.)*q_proj",
    r"(ab|a)*c",
]

# Each must be refused; the fragment is what the reason says.
REFUSED = {
    r"(a+)+$": "repeat that can stop at several places",
    r"(a|aa)*b": "more than one way",
    r"(a|a)*": "more than one way",
    r"(aa?)*": "more than one way",
    r"(a{1,3})+": "more than one way",
    r"(\d+|\d+\.\d+)*": "repeat that can stop at several places",
    r"(a*)*": "empty string",
    r"(a?)*": "empty string",
    r"((ab)*)*": "empty string",
    r"(.*a)*": "repeat that can stop at several places",
    r"(\w+\w)+": "repeat that can stop at several places",
    r"(x+x+)+y": "repeat that can stop at several places",
    r"((a|b)+)+": "repeat that can stop at several places",
    r"^(([a-z])+.)+[A-Z]([a-z])+$": "repeat that can stop at several places",  # OWASP's ReDoS example
    r"(.*\.)*q_proj": "repeat that can stop at several places",
    r".*.*.*.*x": f"at most {MAX_DEGREE} are allowed",
    r".*a.*b.*c.*d.*e": f"at most {MAX_DEGREE} are allowed",
    r"(.*\.){5}x": f"at most {MAX_DEGREE} are allowed",
    r"(a|a){30}": "more than 64 ways",
    r"(?:(?:a|a)(?:a|a)){10}": "more than 64 ways",
    r"(a?){30}a{30}": "empty string",
    r"(a)\1": "backreference",
    r"(?P<x>a)(?P=x)": "backreference",
    r"(a)?(?(1)b|c)": "backreference or a conditional group",
}


@pytest.mark.parametrize("pattern", ACCEPTED)
def test_patterns_peft_and_fastlora_use_are_accepted(pattern):
    assert pattern_problem(pattern) is None
    compiled = compile_module_pattern(pattern, what="target_modules")
    assert (compiled.pattern, compiled.flags) == (pattern, re.compile(pattern).flags)


@pytest.mark.parametrize("pattern, reason", REFUSED.items())
def test_catastrophic_patterns_are_refused_with_the_reason(pattern, reason):
    with pytest.raises(UnsafePatternError) as info:
        compile_module_pattern(pattern, what="target_modules")
    message = str(info.value)
    assert message.startswith(f"target_modules {pattern!r} is refused: ")
    assert reason in message, message
    assert isinstance(info.value, ValueError)


def test_the_callers_error_type_and_what_are_used():
    class AdapterFormatError(ValueError):
        pass

    with pytest.raises(AdapterFormatError, match=r"^rank_pattern key '\(a\+\)\+' is refused: "):
        compile_module_pattern("(a+)+", what="rank_pattern key", error=AdapterFormatError)


@pytest.mark.parametrize("pattern", ["(", "a{2,1}", "(?<=a+)b", "[z-a]", "a{99999999999}"])
def test_invalid_regular_expressions_are_refused(pattern):
    with pytest.raises(UnsafePatternError, match=r"is refused: it is not a valid regular expression \("):
        compile_module_pattern(pattern, what="exclude_modules")


@pytest.mark.parametrize("pattern", [None, 3, b".*", ["q_proj"]])
def test_a_pattern_must_be_a_string(pattern):
    with pytest.raises(TypeError, match="exclude_modules must be a regular expression string, got"):
        compile_module_pattern(pattern, what="exclude_modules")


def test_deeply_nested_patterns_are_refused_not_crashed():
    pattern = "(" * 5000 + "a" + ")" * 5000
    with pytest.raises(UnsafePatternError, match="nested too deeply|not a valid regular expression"):
        compile_module_pattern(pattern, what="target_modules")


def test_fullmatch_module_name():
    compiled = compile_module_pattern(r".*\.(q_proj|v_proj)", what="target_modules")
    assert fullmatch_module_name(compiled, "model.layers.0.self_attn.q_proj")
    assert not fullmatch_module_name(compiled, "model.layers.0.self_attn.q_proj.lora_A")
    assert not fullmatch_module_name(compiled, "q_proj")
    too_long = rf"is {MAX_NAME_LENGTH + 1} characters; expected at most max_length={MAX_NAME_LENGTH}"
    with pytest.raises(ValueError, match=too_long):
        fullmatch_module_name(compiled, "a" * (MAX_NAME_LENGTH + 1))
    assert fullmatch_module_name(compiled, "a" * 2000 + ".q_proj", max_length=4000)
    with pytest.raises(TypeError, match="expected a compiled pattern"):
        fullmatch_module_name(r".*", "x")
    with pytest.raises(TypeError, match="name must be a str"):
        fullmatch_module_name(compiled, None)


def peft_pattern_key_match(key: str, name: str) -> bool:
    """PEFT 0.21's rank_pattern / alpha_pattern match (peft.utils.other.get_pattern_key)."""
    return re.match(rf"(.*\.)?({key})$", name) is not None


KEYS = [
    "q_proj", r"self_attn\.q_proj", r"layers\.0\.self_attn\.q_proj", r"^model\.layers\.0\.self_attn\.q_proj",
    r"model\.layers\.0\.self_attn\.q_proj", r"layers\.\d+\.mlp\..*", r".*\.v_proj", r"proj", r"(q|v)_proj",
    r"\bq_proj", r"(?<=\.)q_proj", r"^q_proj", r"0\.self_attn\.[qv]_proj", r"model\.layers\.1", "a|b",
]
SEGMENTS = ["model", "layers", "0", "1", "10", "self_attn", "q_proj", "v_proj", "mlp", "fc", "fc2", "a", "b", "lm_head"]
NAMES = st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=6).map(".".join)


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(KEYS), segments=st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=6))
def test_match_pattern_key_is_peft_get_pattern_key(key, segments):
    name = ".".join(segments)
    compiled = compile_module_pattern(key, what="rank_pattern key")
    assert match_pattern_key(compiled, name) == peft_pattern_key_match(key, name), (key, name)


@settings(max_examples=100, deadline=None)
@given(names=st.lists(NAMES, min_size=1, max_size=30))
def test_every_pattern_fastlora_writes_is_accepted(names):
    """save_adapter's target_modules (escaped names in one anchored group) and its
    rank_pattern / alpha_pattern keys (escaped names)."""
    target = "^(" + "|".join(re.escape(n) for n in sorted(set(names))) + ")$"
    compiled = compile_module_pattern(target, what="target_modules")
    for name in names:
        assert fullmatch_module_name(compiled, name)
        key = compile_module_pattern(re.escape(name), what="rank_pattern key")
        assert match_pattern_key(key, "base." + name)


# ----------------------------------------------------------------- random patterns, timed


def regexes(max_leaves: int = 10):
    atoms = st.sampled_from(["a", "b", r"\.", ".", "[ab]", r"\w", "[^.]", "(?:)"])
    quantifiers = st.sampled_from(["*", "+", "?", "{0,2}", "{2}", "{1,3}", "*?", "+?"])
    return st.recursive(
        atoms,
        lambda inner: st.one_of(
            st.tuples(inner, inner).map("".join),
            st.tuples(inner, inner).map(lambda t: f"(?:{t[0]}|{t[1]})"),
            st.tuples(inner, quantifiers).map(lambda t: f"(?:{t[0]}){t[1]}"),
        ),
        max_leaves=max_leaves,
    )


ALPHABET = "ab."
PUMPS = ["".join(p) for k in (1, 2, 3) for p in itertools.product(ALPHABET, repeat=k)]


def adversarial_names(n: int):
    """Names made of one short piece repeated (what makes ambiguous patterns
    backtrack), with a last character that may make the match fail."""
    for pump in PUMPS:
        body = (pump * (n // len(pump) + 1))[:n]
        for end in ("", "!", "a", "b", "."):
            yield body + end
            yield end + body + "!"


class Budget(Exception):
    pass


@pytest.mark.skipif(
    not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread(),
    reason="needs SIGALRM in the main thread (re checks for signals while it backtracks)",
)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(pattern=regexes())
def test_accepted_random_patterns_match_adversarial_names_quickly(pattern):
    """Timing, with a wide margin: a refused-shape pattern like `(a|aa)*b` needs
    ~1.6^36 steps on these 36-character names (hours); an accepted one of degree
    3 at most ~36^4 (milliseconds). The budget is 10 s for all 390 names."""
    if pattern_problem(pattern) is not None:
        return
    compiled = re.compile(pattern)

    def over_budget(*_):
        raise Budget()

    previous = signal.signal(signal.SIGALRM, over_budget)
    signal.setitimer(signal.ITIMER_REAL, 10.0 if not os.environ.get("CI") else 20.0)
    try:
        for name in adversarial_names(36):
            compiled.fullmatch(name)
    except Budget:
        pytest.fail(f"accepted pattern {pattern!r} took over the budget on adversarial names")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@given(pattern=regexes(max_leaves=6))
@settings(max_examples=200, deadline=None)
def test_compiling_never_changes_what_a_pattern_means(pattern):
    if pattern_problem(pattern) is None:
        compiled = compile_module_pattern(pattern, what="p")
        assert (compiled.pattern, compiled.flags) == (pattern, re.compile(pattern).flags)
    else:
        with pytest.raises(UnsafePatternError):
            compile_module_pattern(pattern, what="p")
