"""The command line: ``python -m nnfast train ...`` (flags -> ``nnfast.train.train``) and
``python -m nnfast models``. Examples call ``main(["train", ...])`` the same way."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import sys
import typing
from typing import Any

import torch.distributed as dist

import nnfast.models as models
from nnfast import train as T
from nnfast.data import DataError

USAGE = """usage:
  python -m nnfast train --model NAME --preset PRESET --data SOURCE --max_steps N --out DIR
                         [--resume | --overwrite] [--device cpu|cuda] [--compile]
                         [--FIELD VALUE ...]
  python -m nnfast models          list the models and their presets
  python -m nnfast train --help [--model NAME]
                                   list every trainer field and that model's fields
  python -m nnfast export RUN_DIR DIR [--overwrite]
                                   a run's latest checkpoint as a Hugging Face folder
  python -m nnfast prepare SOURCE --out DIR     text/.jsonl(.gz) -> llm.c token shards
  python -m nnfast eval RUN_DIR --task hellaswag --data FILE.jsonl
  python -m nnfast generate RUN_DIR --prompt TEXT
  python -m nnfast consolidate RUN_DIR_OR_CKPT.dcp   sharded (FSDP) -> one .pt checkpoint

SOURCE: auto (Tiny Shakespeare when found in $NNFAST_DATA_DIR, ./, ./data/ or the cache,
else pystdlib; never downloads), shakespeare (downloads it once), pystdlib (the Python
standard library's source, embedded), or a path to a text file, a folder, or .bin token
shards. The first line of a run says which corpus it trains on and why.

Flags may use - or _ (--max-steps == --max_steps). Any field of the model's config is a
flag too (--n_layer 4 --dropout 0.1). Multi-GPU: torchrun
--nproc_per_node N -m nnfast train ...

--resume continues the run in DIR (flags given apply from there on; a different model,
preset, tokenizer or seed is refused). A folder holding a run is never reused without
--resume or --overwrite, and one trainer at a time holds it (DIR/run.lock).
"""
USER_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


TOOLS = {"prepare": "nnfast.prepare", "eval": "nnfast.evaluate", "generate": "nnfast.generate",
         "consolidate": "nnfast.distributed"}


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(T.TrainConfig)


def _convert(field: str, tp: Any, text: str) -> Any:
    """A command-line string as the field's type (``int | None`` accepts ``none``)."""
    args = typing.get_args(tp) or (tp,)
    low = text.strip().lower()
    if type(None) in args and low in ("none", "null"):
        return None
    for t in args:
        if t is bool:
            if low in ("true", "1", "yes", "false", "0", "no"):
                return low in ("true", "1", "yes")
        elif t in (int, float):
            with contextlib.suppress(ValueError):
                return t(text)
        elif t is str:
            return text
    names = " | ".join(getattr(t, "__name__", str(t)) for t in args)
    raise TypeError(f"--{field} expects {names}, got {text!r}")


def parse_args(argv: list[str]) -> tuple[T.TrainConfig, dict[str, Any], bool, set[str]]:
    """``--field value`` pairs -> (trainer config, model overrides, resume, fields given).

    Trainer fields come first; any other name must be a field of the model's config.
    ``--resume`` and ``--compile`` (and any boolean) may stand alone for ``true``.
    """
    types_ = _field_types()
    raw_train, raw_model, resume = {}, {}, False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ValueError(f"expected --FIELD VALUE, got {arg!r}")
        name, _, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        has_value = bool(_) or (i + 1 < len(argv) and not argv[i + 1].startswith("--"))
        if not _ and has_value:
            value, i = argv[i + 1], i + 1
        i += 1
        if name == "resume":
            resume = _convert(name, bool, value) if has_value else True
        elif name in types_:
            if not has_value and types_[name] is not bool:
                raise ValueError(f"--{name} needs a value")
            raw_train[name] = _convert(name, types_[name], value) if has_value else True
        else:
            raw_model[name] = value if has_value else "true"
    cfg = T.TrainConfig(**raw_train)
    if cfg.model not in models.list_models():
        raise ValueError(f"unknown --model {cfg.model!r}; valid: {sorted(models.list_models())}")
    mtypes = models.field_types(cfg.model)
    unknown = sorted(set(raw_model) - set(mtypes))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join('--' + u for u in unknown)}. Trainer fields: "
            f"resume, {', '.join(types_)}. Model fields ({cfg.model}): {', '.join(mtypes)}"
        )
    overrides = models.parse_overrides(cfg.model, raw_model)
    models.make_config(cfg.model, cfg.preset, **overrides)  # bad preset or values: fail now
    return cfg, overrides, resume, set(raw_train) | set(overrides)


def train_main(argv: list[str]) -> int:
    """``python -m nnfast train ...``: 0 on success, 2 for a bad flag, 1 for a failed run;
    errors the user can fix print one line, not a traceback."""
    try:
        cfg, overrides, resume, given = parse_args(argv)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        T.train(cfg, overrides, resume, given)
    except T.UsageError as e:  # found once the checkpoint or the machine is known
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (DataError, FileExistsError, T.TrainingDiverged, T.RunFolderError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the disk, not the code: full, read-only, no permission
        if e.errno not in USER_OS_ERRORS:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def export_main(argv: list[str]) -> int:
    """``python -m nnfast export RUN_DIR DIR [--overwrite]``: 0, or 2 with one error line."""
    overwrite = "--overwrite" in argv
    paths = [a for a in argv if a != "--overwrite"]
    if len(paths) != 2 or any(p.startswith("--") for p in paths):
        print("usage: python -m nnfast export RUN_DIR DIR [--overwrite]", file=sys.stderr)
        return 2
    try:
        out = models.hf.export_run(paths[0], paths[1], overwrite=overwrite)
    except (ValueError, TypeError, FileExistsError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}/config.json and {out}/model.safetensors")
    return 0


def _flag_value(argv: list[str], name: str) -> str | None:
    """The value of ``--name V`` or ``--name=V`` in ``argv`` (a help request), else None."""
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.partition("=")[2]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _type_name(tp: Any) -> str:
    return str(tp).replace("<class '", "").replace("'>", "").replace("typing.", "")


def _train_help(model: str = T.TrainConfig.model, preset: str | None = None) -> str:
    """Every trainer field, then the fields of ``model``'s config with ``preset``'s values
    (None: the default preset's): ``python -m nnfast train --help --model NAME``."""
    if model not in models.list_models():
        raise ValueError(f"unknown --model {model!r}; valid: {sorted(models.list_models())}")
    types_ = _field_types()
    lines = [USAGE, "trainer fields (default):"]
    for f in dataclasses.fields(T.TrainConfig):
        lines.append(f"  --{f.name:<18} {_type_name(types_[f.name]):<14} {f.default!r}")
    config = models.make_config(model, preset)
    presets = ", ".join(models.list_models()[model])
    lines.append(f"model fields of --model {model} ({type(config).__name__}; values of preset "
                 f"{preset or 'default'}; presets: {presets}; other models: --model NAME):")
    for name, tp in models.field_types(model).items():
        lines.append(f"  --{name:<18} {_type_name(tp):<14} {getattr(config, name)!r}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "models":
        for name, presets in models.list_models().items():
            print(f"{name}: {', '.join(presets)}")
        return 0
    if cmd == "export":
        return export_main(rest)
    if cmd in TOOLS:  # prepare, eval, generate, consolidate: each module parses its own flags
        import importlib

        return importlib.import_module(TOOLS[cmd]).main(rest)
    if cmd != "train":
        valid = ", ".join(["train", "models", "export", *TOOLS])
        print(f"error: unknown command {cmd!r}; valid: {valid}\n\n{USAGE}", file=sys.stderr)
        return 2
    if any(a in ("-h", "--help") for a in rest):
        try:
            model = _flag_value(rest, "model") or T.TrainConfig.model
            print(_train_help(model, _flag_value(rest, "preset")))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    return train_main(rest)


if __name__ == "__main__":
    sys.exit(main())
