"""Runs the cases of tests/test_bad_inputs.py in ONE Python process, each as its script's
`__main__` (runpy: the script's own `run_cli(main)`), recording exit status, stdout and stderr.

    python tests/hardening_driver.py cases.json results.json

Why one process: importing torch + transformers costs ~10 s on the 2-core test machines, so
~70 subprocesses would take minutes. A case's `answers` (LLaVA stand-in) replaces the model's
generate() by scripted answers, so that the parser, retries and fallback run on chosen text;
its `env` sets environment variables for its run only.
Each case starts from fresh accelerate state, so cases cannot leak settings into each other.
"""

import contextlib
import io
import itertools
import json
import os
import runpy
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def scripted_llava(answers: list[str] | None):
    """The transformers describer without a model: generate() hands out `answers` in turn (cycling)."""
    if answers is None:
        yield
        return
    from llava_inference import transformers_backend

    cls = transformers_backend.TransformersDescriber
    saved = cls.__init__, cls.generate
    stream = itertools.cycle(answers)
    cls.__init__ = lambda self, *args, **kwargs: None
    cls.generate = lambda self, images, keywords: [next(stream) for _ in images]
    try:
        yield
    finally:
        cls.__init__, cls.generate = saved


@contextlib.contextmanager
def environment(variables: dict[str, str] | None):
    """The case's environment variables set for its run only."""
    saved = {name: os.environ.get(name) for name in variables or {}}
    os.environ.update(variables or {})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value


def run_case(case: dict) -> dict:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    out, err = io.StringIO(), io.StringIO()
    script = case["script"]
    sys.argv = [script, *case["argv"]]
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), scripted_llava(case.get("answers")), \
            environment(case.get("env")):
        try:
            if script.endswith(".py"):
                runpy.run_path(str(REPO / script), run_name="__main__")
            else:
                runpy.run_module(script, run_name="__main__", alter_sys=True)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        except BaseException:  # what the interpreter would print before exiting 1
            traceback.print_exc()
            code = 1
    return dict(rc=code, stdout=out.getvalue(), stderr=err.getvalue())


def main() -> None:
    cases_file, results_file = map(Path, sys.argv[1:3])  # sys.argv is each case's from here on
    cases = json.loads(cases_file.read_text())
    results = {}
    for case in cases:
        results[case["id"]] = run_case(case)
        print(f"{case['id']}: exit {results[case['id']]['rc']}", file=sys.__stderr__, flush=True)
    results_file.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
