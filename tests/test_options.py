"""Generation options: one typed definition, checked by mypy and at run time, plain knobs build the chain."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import pyllama
from pyllama.options import GENERATE_KEYS, SAMPLING_KEYS, SUBMIT_KEYS, chain_specs

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(900)  # mypy --strict over the package, cold
def test_mypy_rejects_a_misspelled_option(tmp_path: Path) -> None:
    user = tmp_path / "user_code.py"
    user.write_text(textwrap.dedent("""
        import pyllama

        def main(ctx: pyllama.Context) -> str:
            with pyllama.generate(ctx, "Hi", max_tokens=4, temperature=0.2) as gen:
                for ev in gen:
                    print(ev.text)
            pyllama.ChatSession(ctx, top_p=0.9).ask("Hi")
            return pyllama.generate_text(ctx, "Hi", max_token=40, temperature=0)
    """))
    out = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(user)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    report = out.stdout + out.stderr
    assert out.returncode == 1, report
    errors = [line for line in report.splitlines() if ": error:" in line]
    # the one error: the misspelling, on its line (the well-spelled options above type-check)
    assert len(errors) == 1, report
    assert "user_code.py:9:" in errors[0] and '"max_token"' in errors[0], report


def test_a_wrong_keyword_names_the_closest_option(model: pyllama.Model) -> None:
    with model.context(n_ctx=128) as ctx:
        with pytest.raises(TypeError, match=r"generate\(\) got an unexpected option 'max_token'; did you mean "
                                            r"'max_tokens'\?"):
            pyllama.generate_text(ctx, "Hello", max_token=4)  # type: ignore[call-arg]
        with pytest.raises(TypeError, match="did you mean 'temperature'"):
            pyllama.generate(ctx, "Hello", temprature=0.5)  # type: ignore[call-arg]
        with pytest.raises(TypeError, match="did you mean 'top_p'"):
            pyllama.ChatSession(ctx, topp=0.5)  # type: ignore[call-arg]
        with pytest.raises(TypeError, match="unexpected option 'seq_id'"):  # not a parallel option
            list(pyllama.generate_parallel(ctx, ["a"], seq_id=1))  # type: ignore[call-arg]


def test_knobs_build_llama_cpp_chain(model: pyllama.Model) -> None:
    with model.context(n_ctx=256) as ctx:
        greedy = pyllama.generate_text(ctx, "Hello world", max_tokens=12)
        assert pyllama.generate_text(ctx, "Hello world", max_tokens=12, temperature=0) == greedy
        sampled = pyllama.generate_text(ctx, "Hello world", max_tokens=12, temperature=1.5, top_k=50, seed=7)
        spelled = pyllama.generate_text(ctx, "Hello world", max_tokens=12, seed=7, sampler=[
            pyllama.TopK(50), pyllama.TopP(0.95), pyllama.MinP(0.05), pyllama.Temp(1.5), pyllama.Dist(7)])
        assert sampled == spelled
        with pytest.raises(ValueError, match="not both"):
            pyllama.generate(ctx, "Hello", temperature=0.5, sampler=[pyllama.Greedy()])


def test_chain_specs_order_and_defaults() -> None:
    specs = chain_specs(repeat_penalty=1.1, logit_bias={3: -5.0}, seed=1)
    kinds = [type(s).__name__ for s in specs]
    assert kinds == ["LogitBias", "Penalties", "TopK", "TopP", "MinP", "Temp", "Dist"]
    assert chain_specs(temperature=0) == [pyllama.Greedy()]


def test_every_api_takes_the_same_options() -> None:
    # the sampling options are a subset of every API's, and nothing is spelled twice
    assert SAMPLING_KEYS < GENERATE_KEYS and SAMPLING_KEYS < SUBMIT_KEYS
    import inspect

    for fn in (pyllama.generate, pyllama.generate_text, pyllama.agenerate, pyllama.Worker.generate,
               pyllama.engine.Engine.submit):
        params = inspect.signature(fn).parameters
        assert any(p.kind is p.VAR_KEYWORD for p in params.values()), fn
        assert not SAMPLING_KEYS & set(params), fn  # no option written out a second time


def test_context_options_are_the_context_signature() -> None:
    """ContextOptions (what model.context, embed and rerank take) lists exactly Context's keywords."""
    import inspect
    import typing

    from pyllama.context_params import ContextOptions

    params = inspect.signature(pyllama.Context.__init__).parameters
    keywords = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
    assert set(typing.get_type_hints(ContextOptions)) == keywords
    for fn in (pyllama.Model.context, pyllama.embed, pyllama.rerank):
        assert any(p.kind is p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values()), fn
