"""The guides stay true: every ``ibot-ray ...`` command in README.md and docs/*.md must parse with the real command
line (``ibot_ray.cli.build_parser``), every ``--set key=value`` must name a config field and give it a valid value (it
is applied with the config loader on top of the command's ``--config``), and every preset, search space, repository
path and local link the guides name must exist. The README's layout table must list the repository's tree.

Commands are read from fenced code blocks and from inline code, with ``\\`` line continuations joined and ``#``
comments dropped. What a guide may write that is not literal:

* placeholders in capitals (``FILE``, ``NAME``, ``N``, ``s3://YOUR-BUCKET/...``, ``KEY=VALUE``): their values are not
  checked, their flags and ``--set`` keys are;
* optional parts in brackets (``[--set train.seed=1 --set data.seed=1]``): checked as if present;
* alternatives with ``|`` (``--set optim.epochs=42|48``): each alternative is checked;
* ``...`` for "and so on": dropped.
"""

from __future__ import annotations

import argparse
import glob
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from ibot_ray.cli import build_parser
from ibot_ray.config import ConfigError, IBOTConfig, load_config, preset_names

REPO = Path(__file__).resolve().parents[1]
GUIDES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
#: Top-level names of the repository whose paths a guide may name (a path under one of them must exist).
REPO_ROOTS = ("ibot_ray", "pipelines", "tune", "benchmarks", "tests", "docs", ".ci")
REPO_FILES = ("cluster.yaml", "cluster.gcp.yaml", "cluster-constraints.txt", "Dockerfile.cluster", "pyproject.toml",
              "README.md")
SPACES = sorted(p.stem for p in (REPO / "tune" / "spaces").glob("*.yaml"))
PLACEHOLDER = re.compile(r"(^|[^a-z])([A-Z][A-Z0-9_]*(-[A-Z0-9]+)*)($|[^a-z])")


@dataclass
class Command:
    doc: str
    line: int
    argv: list  # the tokens after "ibot-ray"
    inline: bool = False  # in inline code: a bare `ibot-ray eval` names the command, it is not one to run
    expect: str = ""  # the config error the guide shows on the next line ("# ibot-ray: config error: ...")

    def where(self) -> str:
        return f"{self.doc}:{self.line}: ibot-ray {' '.join(self.argv)}"


def is_placeholder(value: str) -> bool:
    """A value written in capitals (FILE, NAME, OUT/train.parquet, s3://YOUR-BUCKET/x, <run>): not a literal."""
    return "YOUR-" in value or "<" in value or bool(PLACEHOLDER.search(value.replace("ibot-ray", "")))


# ---- reading commands out of Markdown ---------------------------------------------------------------------------


def _logical_lines(text: str):
    """(first line, last line, text, inline) of every code line (fenced blocks, continuations joined) and every inline
    code span (which may wrap over lines of its paragraph)."""
    in_block, pending, start = False, "", 0
    prose = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_block, pending = not in_block, ""
            prose.append("")
            continue
        prose.append("" if in_block else line)
        if in_block:
            if not pending:
                start = n
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            yield start, n, pending + line, False
            pending = ""
    joined = "\n".join(prose)
    for m in re.finditer(r"`([^`]+)`", joined):
        first = joined.count("\n", 0, m.start()) + 1
        yield first, first + m.group(1).count("\n"), m.group(1).replace("\n", " ").replace("\\|", "|"), True


def _tokens(code: str):
    try:
        return shlex.split(code, comments=True)
    except ValueError:  # unbalanced quotes in prose-like code: not a command
        return []


def commands_in(text: str, doc: str = "<text>") -> list[Command]:
    """Every ``ibot-ray SUBCOMMAND ...`` in a Markdown text (output lines such as ``[ibot-ray] ...`` or
    ``ibot-ray: config error`` are not commands). A command in a code block followed by a line
    ``# ibot-ray: config error: MESSAGE`` is shown failing: it must fail with that message."""
    lines = text.splitlines()
    found = []
    for line, last, code, inline in _logical_lines(text):
        tokens = _tokens(code)
        following = lines[last].strip() if not inline and last < len(lines) else ""
        shown = re.match(r"#?\s*ibot-ray: config error: (.+)", following)
        for i, tok in enumerate(tokens):
            if tok == "ibot-ray" and i + 1 < len(tokens) and re.fullmatch(r"[a-z]+", tokens[i + 1]):
                argv = []
                for t in tokens[i + 1:]:
                    if t in ("&&", "||", ";", "|", ">", "2>&1") or t.startswith(">"):
                        break
                    argv.append(t)
                found.append(Command(doc, line, argv, inline, shown.group(1) if shown else ""))
    return found


def _unbracket(tokens: list[str]) -> list[str]:
    """Optional groups ``[--set a=1 --set b=2]`` -> their tokens; list values such as ``x=[1,2]`` are kept."""
    out = []
    for t in tokens:
        if t.startswith("[-"):
            t = t[1:]
        if t.endswith("]") and t.count("[") < t.count("]"):
            t = t[:-1]
        if t and t != "...":
            out.append(t)
    return out


def _variants(tokens: list[str]) -> list[list[str]]:
    """The token list once per ``|`` alternative (the others at their first alternative)."""
    def alts(t: str) -> list[str]:
        if "|" not in t or t.startswith(("{", "'")):
            return [t]
        key, eq, value = t.rpartition("=") if "=" in t.split("|")[0] else ("", "", t)
        return [f"{key}{eq}{a}" for a in value.split("|")]
    base = [alts(t)[0] for t in tokens]
    out = [base]
    for i, t in enumerate(tokens):
        for a in alts(t)[1:]:
            out.append(base[:i] + [a] + base[i + 1:])
    return out


# ---- checking one command ---------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # raise instead of printing usage and exiting
        raise ValueError(message)


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    for sub in action.choices.values():
        sub.__class__ = _Parser
    return action.choices


def _fill_placeholders(sub: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """A placeholder value of an int/float/choices option becomes a valid one, so that the flags still parse."""
    by_flag = {s: a for a in sub._actions for s in a.option_strings}  # noqa: SLF001
    out = list(argv)
    for i in range(1, len(out)):
        action = by_flag.get(out[i - 1])
        if action is not None and action.nargs is None and is_placeholder(out[i]):
            if action.choices:
                out[i] = list(action.choices)[0]
            elif action.type in (int, float):
                out[i] = "1"
    return out


def _repo_path_error(value: str) -> str | None:
    """Why ``value``, a path into the repository, does not exist (None: it exists, or it is not a repository path)."""
    value = value.strip().rstrip(".,;:)").lstrip("(")
    if value.startswith("./"):
        value = value[2:]
    first = value.split("/", 1)[0]
    if is_placeholder(value) or not (first in REPO_ROOTS and "/" in value or value in REPO_FILES):
        return None
    if any(c in value for c in "*?["):
        return None if glob.glob(str(REPO / value)) else f"{value}: matches no file in the repository"
    return None if (REPO / value.split("#")[0]).exists() else f"{value}: no such file or folder in the repository"


def check_command(cmd: Command) -> list[str]:
    """The errors of one guide command (empty: it is true)."""
    subs = _subparsers()
    if not cmd.argv or cmd.argv[0] not in subs:
        return [f"{cmd.where()}: no such command (commands: {', '.join(subs)})"]
    sub = subs[cmd.argv[0]]
    if cmd.inline and len(cmd.argv) == 1:
        return []  # `ibot-ray eval` in prose names the command
    errors = []
    for variant in _variants(_unbracket(cmd.argv[1:])):
        try:
            args = sub.parse_args(_fill_placeholders(sub, variant))
        except ValueError as e:
            errors.append(f"{cmd.where()}: {e}")
            continue
        found = _check_args(cmd.argv[0], args, sub)
        if cmd.expect:  # the guide shows this command failing: it must fail, with the message shown
            if not any(cmd.expect in e for e in found):
                errors.append(f"{cmd.where()}: the guide shows 'config error: {cmd.expect}', the command gives "
                              f"{found or 'no error'}")
        else:
            errors += [f"{cmd.where()}: {e}" for e in found]
    return sorted(set(errors))


def _check_args(command: str, args: argparse.Namespace, sub: argparse.ArgumentParser) -> list[str]:
    errors = []
    config = getattr(args, "config", None)
    # pretrain without --config: demo, or with --data a preset chosen from the images when the run starts (the
    # guides' --set values are checked on demo, whose fields every preset has)
    base = sub.get_default("config") or ("demo" if command == "pretrain" else None)
    if config is not None and not is_placeholder(config):
        if "/" not in config and not config.endswith((".yaml", ".yml")):
            if config not in preset_names():
                errors.append(f"--config {config}: no such preset (presets: {', '.join(preset_names())})")
            else:
                base = config
        elif e := _repo_path_error(config):
            errors.append(e)
        elif (REPO / config).is_file():
            base = str(REPO / config)  # else a file of the user's (e.g. written by `ibot-ray config`)
    sets = [s for s in getattr(args, "overrides", []) or []]
    literal = []
    for item in sets:
        if "=" not in item:
            errors.append(f"--set {item}: expected section.field=value")
            continue
        key, value = item.split("=", 1)
        if is_placeholder(key):
            continue
        section, _, name = key.partition(".")
        if not hasattr(IBOTConfig(), section) or not hasattr(getattr(IBOTConfig(), section), name):
            errors.append(f"--set {item}: {key} is not a config field")
        elif not is_placeholder(value):
            literal.append(item)
    if not errors:
        try:
            load_config(base, literal)
        except ConfigError as e:
            errors.append(f"--set {' '.join(literal)} on --config {base}: {e}")
    space = getattr(args, "space", None)
    if space and not is_placeholder(space):
        if "/" not in space and not space.endswith(".yaml"):
            if space not in SPACES:
                errors.append(f"--space {space}: no such shipped space (spaces: {', '.join(SPACES)})")
        elif e := _repo_path_error(space) or (None if (REPO / space).is_file() else f"--space {space}: no file"):
            errors.append(e)
    for name in ("data", "train", "val", "model", "checkpoint"):
        value = getattr(args, name, None)
        if isinstance(value, str) and (e := _repo_path_error(value)):
            errors.append(e)
    return errors


def check_paths(text: str, doc: str = "<text>") -> list[str]:
    """Repository paths named in code (``benchmarks/quality.py``, ``ibot_ray/configs/*.yaml``) and local links
    (``[x](docs/recipes.md#anchor)``) that do not exist."""
    errors = []
    for line, _, code, _ in _logical_lines(text):
        for tok in _tokens(code) or code.split():
            for part in re.split(r"[=,]", tok):
                if e := _repo_path_error(part):
                    errors.append(f"{doc}:{line}: {e}")
    base = (REPO / doc).parent if doc != "<text>" else REPO
    for n, line in enumerate(text.splitlines(), 1):
        for target in re.findall(r"\]\(([^)\s]+)\)", line):
            if re.match(r"[a-z]+://|mailto:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (base / path).resolve() if path else (REPO / doc)
            if not file.exists():
                errors.append(f"{doc}:{n}: link {target}: {path} does not exist")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
                errors.append(f"{doc}:{n}: link {target}: no heading #{anchor} in {file.relative_to(REPO)}")
    return errors


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    in_block = False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            in_block = not in_block
        if in_block or not line.startswith("#"):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


# ---- the guides -------------------------------------------------------------------------------------------------


def _rel(p: Path) -> str:
    return str(p.relative_to(REPO))


def test_the_guides_exist_and_show_commands():
    assert (REPO / "docs").is_dir() and len(GUIDES) > 5
    every = [c for g in GUIDES for c in commands_in(g.read_text(), _rel(g))]
    assert {c.argv[0] for c in every} >= {"pretrain", "eval", "tune", "export", "config"}
    assert len(every) > 40, len(every)


@pytest.mark.parametrize("guide", GUIDES, ids=_rel)
def test_every_command_in_the_guide_is_true(guide):
    errors = [e for c in commands_in(guide.read_text(), _rel(guide)) for e in check_command(c)]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("guide", GUIDES, ids=_rel)
def test_every_path_and_link_in_the_guide_exists(guide):
    errors = check_paths(guide.read_text(), _rel(guide))
    assert not errors, "\n".join(errors)


def test_the_readme_layout_table_matches_the_tree():
    """Every path in the README's Layout table exists, and every module and top-level entry of the repository is
    in it (a new module needs its row)."""
    text = (REPO / "README.md").read_text()
    layout = text[text.index("## Layout"):]
    layout = layout[:layout.index("\n## ", 1)]
    named = set()
    for cell in re.findall(r"^\| (.+?) \|", layout, re.M):
        for path in re.findall(r"`([^`]+)`", cell):
            assert glob.glob(str(REPO / path)), f"layout table: {path} does not exist"
            named |= {str(Path(p).relative_to(REPO)) for p in glob.glob(str(REPO / path))}
            named.add(path.rstrip("/"))
    modules = [_rel(p) for d in ("ibot_ray", "pipelines", "tune") for p in (REPO / d).glob("*.py")
               if p.name != "__init__.py"]
    missing = [m for m in modules if m not in named]
    assert not missing, f"modules missing from the README's layout table: {missing}"
    top = [p.name for p in REPO.iterdir() if p.name in REPO_ROOTS + REPO_FILES and p.name not in ("README.md",
                                                                                                  "pyproject.toml")]
    missing = [t for t in top if not any(n == t or n.startswith(t + "/") for n in named)]
    assert not missing, f"top-level entries missing from the README's layout table: {missing}"


def test_every_subcommand_help_starts_with_what_it_does_and_one_true_example():
    for name, sub in _subparsers().items():
        help_text = sub.format_help()
        what, _, example = help_text.partition("\nexample:\n")
        assert example, f"ibot-ray {name} --help shows no example"
        assert len(what.split("\n\n", 1)[1].split()) > 12, f"ibot-ray {name} --help: say what it does"
        assert help_text.index("example:") < help_text.index("options:"), "the example comes before the options"
        examples = commands_in(f"```\n{example.split(chr(10) + chr(10))[0]}\n```", f"ibot-ray {name} --help")
        assert [c.argv[0] for c in examples] == [name]
        assert not check_command(examples[0]), check_command(examples[0])


# ---- the checker catches what it should -------------------------------------------------------------------------


def _errors(markdown: str) -> list[str]:
    return [e for c in commands_in(markdown) for e in check_command(c)] + check_paths(markdown)


def test_the_checker_passes_true_commands():
    ok = """
```bash
ibot-ray pretrain --config demo --data ibot_ray/demo_data/train.parquet --set optim.epochs=2 \\
    --set 'crops.global_crops_scale=[0.7,1.0]' [--set train.seed=1 --set data.seed=1]   # a comment
ibot-ray tune --space demo_quick --trials N --set optim.epochs=42|48 --storage s3://YOUR-BUCKET/x
ibot-ray eval RUN --config demo --train demo --val demo --set eval.image_size=24|32
[ibot-ray] step 10/2232 (0%) epoch 1/36        <- output, not a command
ibot-ray: config error: loss.teacher_temp: temperature must be positive, got -1.0
ibot-ray config --set loss.teacher_temp=-1
# ibot-ray: config error: loss.teacher_temp: temperature must be positive, got -1.0
```
Inline: `ibot-ray config --config vit_small_16 --set loss.teacher_temp=0.05`, `python benchmarks/quality.py`,
[the recipes](docs/recipes.md) and `tune/spaces/*.yaml`.
"""
    assert len(commands_in(ok)) == 5
    expected = [c.expect for c in commands_in(ok) if c.expect]
    assert expected == ["loss.teacher_temp: temperature must be positive, got -1.0"]
    assert _errors(ok) == []


@pytest.mark.parametrize("bad, message", [
    ("`ibot-ray pretrain --bogus 3`", "unrecognized arguments: --bogus"),
    ("`ibot-ray pretrian --data x`", "no such command"),
    ("```\nibot-ray eval RUN --val demo\n```", "the following arguments are required: --train"),
    ("`ibot-ray pretrain --set optim.epoch=2`", "optim.epoch is not a config field"),
    ("`ibot-ray pretrain --set loss.teacher_temp=-1`", "temperature must be positive"),
    ("```\nibot-ray pretrain \\\n    --set optim.epochs=4|zero\n```", "optim.epochs: expected an integer"),
    ("`ibot-ray tune --space tau_mommentum`", "no such shipped space"),
    ("`ibot-ray pretrain --config vit_small_61`", "no such preset"),
    ("`ibot-ray pretrain --config ibot_ray/configs/nope.yaml`", "no such file"),
    ("`ibot-ray eval --train ibot_ray/demo_data/nope.parquet --val demo RUN`", "demo_data/nope.parquet: no such"),
    ("`python benchmarks/qualitty.py --config demo`", "benchmarks/qualitty.py: no such file"),
    ("see [the guide](docs/nope.md)", "docs/nope.md does not exist"),
    ("```\nibot-ray config --set loss.teacher_temp=0.1\n# ibot-ray: config error: loss.teacher_temp: must be\n```",
     "the guide shows 'config error: loss.teacher_temp: must be', the command gives no error"),
    ("see [recipes](docs/recipes.md#no-such-heading)", "no heading #no-such-heading"),
])
def test_the_checker_catches(bad, message):
    errors = _errors(bad)
    assert any(message in e for e in errors), errors
