"""Every code block of the README is checked here, so the README cannot drift from the code.

* ```python blocks run as written, in a fresh interpreter (``import nnfast`` with nothing
  imported before it, as a user's script starts), on the CPU.
* shell blocks (```bash and plain ```) are split into commands; each command must match a
  handler below, or the test fails and names it. Handlers run what is cheap (``nnfast
  models``, ``--help``), run training jobs with tiny overrides (2 steps), and only check the
  arguments of what cannot run here (multi-GPU torchrun, GPU scripts, downloads, the data
  and run tools that need them, the full suite that is this run). The train commands in
  the architecture table are checked the same way.
* The two ```bash commands are the newcomer's path: CI must run the test command verbatim.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from nnfast import __main__ as cli
from nnfast import data as D
from nnfast import train as T

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
SHELL = ("bash", "sh", "text", "")  # fenced blocks of commands
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.S | re.M)
TINY = ["--max_steps", "2", "--batch_size", "2", "--eval_interval", "2", "--eval_steps", "1",
        "--sample_tokens", "8", "--device", "cpu"]
# Checks appended to a python block that contains the key: the block does what it says.
EXPECT = {
    "return_logits=True": "assert logits.shape == (*idx.shape, model.config.vocab_size)\n"
                          "assert loss.grad_fn is not None\n",
    "model(idx, targets)": "assert model(idx, targets)[0] is None\n",
}


def _blocks() -> list[tuple[str, str, int]]:
    """(language, text, line) of every fenced block."""
    return [(m.group(1), m.group(2), README.count("\n", 0, m.start()) + 1)
            for m in FENCE.finditer(README)]


def _readme_commands() -> list[str]:
    return [text.strip() for lang, text, _ in _blocks() if lang == "bash"]


def _commands(text: str) -> list[list[str]]:
    """Shell text -> commands (argv lists): continuations joined, comments dropped, and
    ``a && b`` split into ``a`` and ``b``."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        while argv:
            cut = argv.index("&&") if "&&" in argv else len(argv)
            out.append(argv[:cut])
            argv = argv[cut + 1:]
    return out


def _shell_commands() -> list[tuple[int, list[str]]]:
    return [(line, argv) for lang, text, line in _blocks() if lang in SHELL
            for argv in _commands(text)]


def _table_commands() -> list[list[str]]:
    rows = [line for line in README.splitlines() if line.startswith("|")]
    return [shlex.split(c) for row in rows
            for c in re.findall(r"`(python -m nnfast train [^`]+)`", row)]


# ----------------------------------------------------------------------------- handlers
def _extras() -> set[str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            return {ast.literal_eval(k) for k in node.value.keys}
    return set()


def _pip(argv: list[str], tmp_path: Path) -> None:
    """``pip install``: the pinned torch parses, the extras exist in setup.py."""
    args = [a for a in argv[2:] if not a.startswith("-")]
    for a in args:
        m = re.fullmatch(r"\.(?:\[([\w,]+)\])?", a)
        if m:
            missing = set((m.group(1) or "").split(",")) - _extras() - {""}
            assert not missing, f"setup.py has no extra {missing}"
        else:
            assert re.fullmatch(r"[A-Za-z0-9_.-]+(==[\w.+]+)?", a), a


def _pytest(argv: list[str], tmp_path: Path) -> None:
    """The test command is this very run (and CI's, checked below); benchmarks must collect."""
    target = argv[argv.index("pytest") + 1] if argv[0].endswith("python") else argv[1]
    if target == "tests":
        return
    assert target.split("/")[0] == "benchmarks", argv
    cmd = [sys.executable, "-m", "pytest", target, "--collect-only", "-q",
           "-p", "no:cacheprovider"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def _bash_script(argv: list[str], tmp_path: Path) -> None:
    """A GPU script: it exists and parses (it cannot run without a GPU)."""
    script = ROOT / argv[1]
    assert script.is_file(), script
    subprocess.run(["bash", "-n", str(script)], check=True)


def _shakespeare_here() -> bool:
    try:
        return D._local_shakespeare() is not None
    except D.DataError:
        return False


def _train(args: list[str], tmp_path: Path, run: bool = True) -> None:
    """``nnfast train ARGS``: the arguments parse (model, preset, every field); then 2 steps
    on the CPU with the command's own model, unless its data needs a download."""
    cfg, overrides, _, _ = cli.parse_args(args)
    assert cfg.model and overrides is not None
    if not run:
        return
    if cfg.data == "shakespeare" and not _shakespeare_here():
        pytest.skip("arguments checked; the 2-step run needs Tiny Shakespeare on this "
                    "machine (NNFAST_DATA_DIR; CI sets it)")
    if cfg.data == D.SHAKESPEARE_FILE and not Path(cfg.data).exists():  # "the file you have"
        local = D._local_shakespeare()
        if local is None:
            pytest.skip("arguments checked; the 2-step run needs tinyshakespeare.txt here")
        args = [*args, "--data", str(local[0])]
    small = {"gpt2-124m": "debug", "llama2-124m": "debug"}  # keep the tiny run tiny
    preset = small.get(cfg.preset, cfg.preset)
    out = tmp_path / f"run-{cfg.model}"
    res = cli.train_main([*args, "--preset", preset, *TINY, "--out", str(out)])
    assert res == 0 and (out / "metrics.jsonl").is_file()


def _nnfast(argv: list[str], tmp_path: Path) -> None:
    """``python -m nnfast ...``: cheap subcommands run; train jobs run tiny."""
    args = argv[argv.index("nnfast") + 1:]
    if args[0] == "train" and not any(a in ("-h", "--help") for a in args):
        _train(args[1:], tmp_path)
    else:
        assert cli.main(args) == 0, args


TORCHRUN_FLAGS = {"--nnodes", "--nproc_per_node", "--node_rank", "--rdzv_backend",
                  "--rdzv_endpoint", "--rdzv_id", "--master_addr", "--master_port"}


def _torchrun(argv: list[str], tmp_path: Path) -> None:
    """Multi-process (multi-GPU, multi-node) launches cannot run here: the torchrun flags and
    the job's own arguments are checked (the data path may be a placeholder)."""
    i = argv.index("-m")
    assert argv[i + 1] == "nnfast" and argv[i + 2] == "train", argv
    launcher = argv[1:i]
    flags = launcher[0::2]
    assert len(launcher) % 2 == 0 and set(flags) <= TORCHRUN_FLAGS, launcher
    assert "--nproc_per_node" in flags, launcher
    _train(argv[i + 3:], tmp_path, run=False)


def _tools() -> set[str]:
    """The subcommands besides train and models (prepare, eval, ... export), where present."""
    return {*getattr(cli, "TOOLS", {}), *(["export"] if hasattr(cli, "export_main") else [])}


def _nnfast_tool(argv: list[str], tmp_path: Path) -> None:
    """``prepare``, ``eval``, ``generate``, ``consolidate``, ``export`` need a corpus, a trained
    run or a download: only their arguments are checked, by the tool's own parser."""
    sub, rest = argv[3], argv[4:]
    if sub == "export":  # RUN_DIR DIR [--overwrite]
        paths = [a for a in rest if not a.startswith("--")]
        assert len(paths) == 2 and set(rest) - set(paths) <= {"--overwrite"}, rest
        return
    module = importlib.import_module(cli.TOOLS[sub])
    try:
        module.parser().parse_args(rest)
    except SystemExit as e:  # argparse's way of rejecting a flag
        raise AssertionError(f"nnfast {sub} rejects {rest}") from e


def _python_c(argv: list[str], tmp_path: Path) -> None:
    """``python -c CODE`` that downloads a data set: it compiles (it cannot run offline)."""
    compile(argv[2], "<README python -c>", "exec")


def _curl(argv: list[str], tmp_path: Path) -> None:
    """A download: a well-formed https URL (no network here)."""
    assert re.fullmatch(r"https://[\w.-]+/\S+", argv[-1]), argv


def _example(argv: list[str], tmp_path: Path) -> None:
    """``python examples/train_gpt2.py``: both its GPU and CPU defaults parse, and the CPU job
    runs 2 steps in a fresh process, saying first what it trains on."""
    assert argv[1] == "examples/train_gpt2.py", f"no check for {argv[1]}: add one"
    spec = importlib.util.spec_from_file_location("train_gpt2", ROOT / argv[1])
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    for defaults in (example.GPU, example.CPU):
        cli.parse_args([*defaults.split(), *argv[2:]])
    out = tmp_path / "main-job"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)  # a user's CPU run: the reference path
    cmd = [sys.executable, argv[1], *argv[2:], *TINY, "--device", "cpu", "--out", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.startswith("data: "), res.stdout[:500]
    assert {"metrics.jsonl", "sample.txt", "tokenizer.json", "latest"} <= {
        p.name for p in out.iterdir()}


def _bench_module(argv: list[str], tmp_path: Path) -> None:
    """``python -m benchmarks.test_overhead``: its ratio table, 1 round instead of 101."""
    assert argv[2] == "benchmarks.test_overhead", f"no check for {argv[2]}: add one"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, *argv[1:], "1"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "| op | pass |" in res.stdout, res.stderr[-3000:]


def _nanogpt(argv: list[str], tmp_path: Path) -> None:
    """nanoGPT's own command, shown for a side-by-side comparison: another repository's."""
    assert not (ROOT / "train.py").exists()  # so it cannot be mistaken for ours
    pytest.skip("nanoGPT's command (github.com/karpathy/nanoGPT), not this repository's")


def _venv(argv: list[str], tmp_path: Path) -> None:
    assert argv[1:] == ["-m", "venv", ".venv"], argv


def _handler(argv: list[str]):
    exe = Path(argv[0]).name
    if exe in ("python", "python3") and argv[1:3] == ["-m", "venv"]:
        return _venv
    if exe == "pip" and argv[1] == "install":
        return _pip
    if exe == "pytest" or argv[1:3] == ["-m", "pytest"]:
        return _pytest
    if exe in ("python", "python3") and argv[1:3] == ["-m", "nnfast"]:
        if argv[3] in ("models", "train"):
            return _nnfast
        return _nnfast_tool if argv[3] in _tools() else None
    if exe in ("python", "python3") and argv[1] == "-c":
        return _python_c
    if exe == "curl":
        return _curl
    if exe in ("python", "python3") and argv[1].startswith("examples/"):
        return _example
    if exe == "torchrun":
        return _torchrun
    if exe in ("python", "python3") and argv[1] == "-m" and argv[2].startswith("benchmarks."):
        return _bench_module
    if exe in ("python", "python3") and argv[1] == "train.py" and argv[2].startswith("config/"):
        return _nanogpt
    if exe == "bash" and argv[1].startswith("scripts/"):
        return _bash_script
    return None


# ----------------------------------------------------------------------------- tests
def test_every_shell_command_has_a_check():
    unknown = [f"README line {line}: {shlex.join(a)}" for line, a in _shell_commands()
               if _handler(a) is None]
    assert not unknown, "commands without a check in tests/test_readme.py:\n" + "\n".join(unknown)


@pytest.mark.parametrize("line,argv", _shell_commands(),
                         ids=[f"L{line}-{' '.join(a[:4])}" for line, a in _shell_commands()])
def test_shell_command(line, argv, tmp_path, monkeypatch):
    handler = _handler(argv)
    assert handler is not None, f"README line {line}: no check for {shlex.join(argv)}"
    monkeypatch.setenv("NNFAST_BACKEND", "torch")  # CPU runs: the reference path, fast
    monkeypatch.setattr(T.torch, "set_num_threads", lambda n: None)  # leave the suite's
    handler(argv, tmp_path)


@pytest.mark.parametrize("argv", _table_commands(), ids=lambda a: a[a.index("--model") + 1])
def test_architecture_table_command(argv, tmp_path, monkeypatch):
    monkeypatch.setenv("NNFAST_BACKEND", "torch")
    monkeypatch.setattr(T.torch, "set_num_threads", lambda n: None)
    _train(argv[4:], tmp_path)


@pytest.mark.parametrize("text,line", [(t, n) for lang, t, n in _blocks() if lang == "python"])
def test_python_block_runs(text, line, tmp_path):
    for node in ast.walk(ast.parse(text)):  # an optional extra's package (the block says which)
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
        for top in {n.split(".")[0] for n in names}:
            if importlib.util.find_spec(top) is None:
                pytest.skip(f"README line {line} needs {top}, not installed here")
    checks = "".join(code for key, code in EXPECT.items() if key in text)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)  # what a user's CPU script gets: the reference path
    res = subprocess.run([sys.executable, "-c", text + "\n" + checks], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"README line {line}:\n{res.stderr[-3000:]}"


def test_no_unchecked_blocks():
    langs = {lang for lang, _, _ in _blocks()}
    assert langs <= {"python", *SHELL}, f"a block language nobody checks: {langs}"
    assert any(lang == "python" for lang, _, _ in _blocks())
    assert len(_table_commands()) >= 10  # the architecture table was found


def test_readme_has_exactly_two_commands():
    cmds = _readme_commands()
    assert len(cmds) == 2, cmds
    assert "pytest tests" in cmds[0]
    assert "nnfast train" in cmds[1] or "examples/" in cmds[1]


def test_ci_runs_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    block = ci.split("# README test command (begin)\n")[1].split("\n# README test command (end)")[0]
    assert block.strip() == _readme_commands()[0].strip()
