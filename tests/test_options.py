"""Options are declared once, on the config fields: the CLI is derived from them, flag for flag and default
for default, and the benchmark suites come from one table. No test here starts Ray."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
from cli_before_refactor import OLD_CLI

from aidetect_batch import cli
from aidetect_batch.bench import suites
from aidetect_batch.config import cli_default, cli_fields, flag_of, from_args, options_of
from aidetect_batch.errors import ConfigError
from aidetect_batch.report import aggregate
from aidetect_batch.report.config import RepostsConfig
from aidetect_batch.scan.config import ScanConfig, ScanOptions
from aidetect_batch.serve_config import ServeConfig
from aidetect_batch.train.config import EvalConfig, PruneConfig, TrainConfig, TrainOptions

# The smallest valid arguments of each command, and the same config built by its constructor.
REQUIRED = {
    "scan": (["src", "--checkpoint", "m.pt", "--out", "o"], dict(sources=("src",), checkpoint="m.pt", out="o")),
    "train": (["data", "--out", "o"], dict(dataset="data", out="o")),
    "evaluate": (["data", "--checkpoint", "m.pt", "--out", "o"], dict(dataset="data", checkpoint="m.pt", out="o")),
    "prune": (
        ["--checkpoint", "m.pt", "--dataset", "d", "--out", "o"],
        dict(checkpoint="m.pt", dataset="d", out="o"),
    ),
    "benchmark": ([], {}),
    "report": (["o"], dict(out="o")),
    "reposts": (["o"], dict(out="o")),
    "serve": (["--checkpoint", "m.pt"], dict(checkpoint="m.pt")),
    "demo": ([], {}),
}


@pytest.fixture(autouse=True)
def no_token(monkeypatch):
    monkeypatch.delenv("AIDETECT_TOKEN", raising=False)


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _option_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


def test_every_command_has_a_config_and_the_commands_table_is_the_parser():
    assert list(subparsers()) == list(cli.COMMANDS) == list(REQUIRED)


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_field_has_exactly_one_flag_with_the_dataclass_default(command):
    config = cli.COMMANDS[command].config
    parser = subparsers()[command]
    by_dest: dict[str, list[argparse.Action]] = {}
    for action in _option_actions(parser):
        by_dest.setdefault(action.dest, []).append(action)
    fields = cli_fields(config)
    assert sorted(by_dest) == sorted(f.name for f in fields), "one argument per field, and no other"
    for field in fields:
        actions = by_dest[field.name]
        spec = options_of(field)
        assert len(actions) == (len(spec.const) or 1), field.name
        assert flag_of(field) in (actions[0].option_strings or [actions[0].dest]), field.name
        if field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING:
            assert actions[0].default == cli_default(field), field.name
    internal = [f.name for f in dataclasses.fields(config) if options_of(f).internal]
    assert all(options_of(f).internal.strip() for f in dataclasses.fields(config) if f.name in internal)


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_cli_with_only_the_required_arguments_builds_the_constructors_config(command):
    argv, required = REQUIRED[command]
    args = cli.build_parser().parse_args([command, *argv])
    assert args.handler is cli.COMMANDS[command].run
    assert from_args(args.config, args) == cli.COMMANDS[command].config(**required)


def test_a_full_scan_command_line_round_trips():
    argv = "scan a b --checkpoint m.pt --out o --actors 2,3 --batch-size 8 --precision bf16 --no-c2pa --phash"
    argv += " --commit-every 5 --group-depth 2 --storage-option endpoint_url=http://h:9000 --storage-option anon=true"
    args = cli.build_parser().parse_args(argv.split())
    expected = ScanConfig(
        sources=("a", "b"),
        checkpoint="m.pt",
        out="o",
        actors=(2, 3),
        batch_size=8,
        precision="bf16",
        c2pa=False,
        phash=True,
        commit_every_s=5.0,
        prefix_depth=2,
        storage_options={"client_kwargs": {"endpoint_url": "http://h:9000"}, "anon": True},
    )
    assert from_args(ScanConfig, args) == expected


def test_train_lists_and_tri_states_round_trip():
    argv = ["train", "d", "--out", "o", "--augment", "flip,color", "--split", "0.6,0.2,0.2", "--cpu"]
    args = cli.build_parser().parse_args([*argv, "--no-near-duplicates", "--workers", "2", "--max-file-mb", "9"])
    expected = TrainConfig(
        dataset="d",
        out="o",
        augment=("flip", "color"),
        fractions=(0.6, 0.2, 0.2),
        use_gpu=False,
        near_duplicates=False,
        workers=2,
        max_file_mb=9.0,
    )
    assert from_args(TrainConfig, args) == expected
    none = cli.build_parser().parse_args(["train", "d", "--out", "o", "--augment", "none", "--gpu"])
    assert from_args(TrainConfig, none).augment == () and from_args(TrainConfig, none).use_gpu is True


def test_evaluate_and_prune_pass_typed_options_through():
    argv = ["evaluate", "d", "--checkpoint", "m", "--out", "o", "--actors", "2", "--max-tiles", "4"]
    args = cli.build_parser().parse_args([*argv, "--perturb", "jpeg:50"])
    cfg = from_args(EvalConfig, args)
    assert cfg.scan_options == ScanOptions(actors=(2, 2), max_tiles=4) and cfg.perturb == ("jpeg:50",)
    assert json.loads(json.dumps(cfg.to_json()))["scan_options"]["max_tiles"] == 4, "metrics.json keeps its layout"
    prune = cli.build_parser().parse_args(
        ["prune", "--checkpoint", "m", "--dataset", "d", "--out", "o", "--workers", "3", "--unstructured"]
    )
    pcfg = from_args(PruneConfig, prune)
    assert pcfg.train_options == TrainOptions(workers=3) and pcfg.method == "unstructured"
    assert pcfg.to_json()["train_options"] == {"workers": 3}
    with pytest.raises(ConfigError, match="--actors needs 1 <= MIN <= MAX"):
        ScanOptions(actors=(3, 2))


def test_serve_derived_flags_keep_their_names_and_units(monkeypatch):
    args = cli.build_parser().parse_args(["serve", "--checkpoint", "m", "--max-upload-mb", "2"])
    assert from_args(ServeConfig, args).max_upload_bytes == 2 * 2**20
    monkeypatch.setenv("AIDETECT_TOKEN", "from-env")
    args = cli.build_parser().parse_args(["serve", "--checkpoint", "m", "--host", "0.0.0.0"])
    cfg = from_args(ServeConfig, args)
    assert cfg.token == "from-env" and cfg.to_json()["token"] == "***" and "from-env" not in repr(cfg)


def test_bad_flag_text_is_a_config_error_naming_the_flag():
    args = cli.build_parser().parse_args(["prune", "--checkpoint", "m", "--dataset", "d", "--out", "o"])
    args.amounts = "0.1,x"
    with pytest.raises(ConfigError, match="--amount takes fractions"):
        from_args(PruneConfig, args)
    args = cli.build_parser().parse_args(["serve", "--checkpoint", "m", "--max-upload-mb", "lots"])
    with pytest.raises(ConfigError, match="--max-upload-mb"):
        from_args(ServeConfig, args)


def test_prefix_depth_keeps_its_old_flag_and_old_runs_rebuild_with_it(monkeypatch):
    for command in (["scan", "s", "--checkpoint", "m", "--out", "o"], ["reposts", "o"]):
        old = cli.build_parser().parse_args([*command, "--group-depth", "3"])
        new = cli.build_parser().parse_args([*command, "--prefix-depth", "3"])
        assert from_args(old.config, old).prefix_depth == from_args(new.config, new).prefix_depth == 3
    assert RepostsConfig(out="o", prefix_depth=2).to_json()["prefix_depth"] == 2
    seen = []
    monkeypatch.setattr(aggregate, "read_json", lambda uri, so: {"config": {"group_depth": 3}})
    monkeypatch.setattr(aggregate, "write_report", lambda out, depth, *a, **k: seen.append(depth))
    aggregate.rebuild("/nowhere", {}, 0)
    monkeypatch.setattr(aggregate, "read_json", lambda uri, so: {"config": {"prefix_depth": 2}})
    aggregate.rebuild("/nowhere", {}, 0)
    assert seen == [3, 2], "an old _run.json's group_depth is still the report's prefix depth"


def test_suite_choices_are_the_suite_table():
    (suite,) = [a for a in subparsers()["benchmark"]._actions if a.dest == "suite"]
    assert list(suite.choices) == [*suites.SUITES, suites.ALL] == list(suites.suite_names())
    assert suites.chosen_suites("all") == [n for n, s in suites.SUITES.items() if s.in_all]
    fields = {f.name for f in dataclasses.fields(cli.COMMANDS["benchmark"].config)}
    for name, entry in suites.SUITES.items():
        assert set(entry.options) <= fields, name


def test_gpu_suite_receives_scan_arch_precision_and_photos(monkeypatch, tmp_path, capsys):
    """The gpu suite runs with the benchmark's --scan-arch, --precision and --photos (without a GPU: the suite
    itself is replaced by a recorder)."""
    received = []

    def recorder(options):
        received.append(options)
        return {"options": dataclasses.asdict(options)}

    monkeypatch.setattr(suites.gpu, "run_gpu_suite", recorder)
    monkeypatch.setitem(suites._LINES, "gpu", lambda section: ["gpu: recorded"])
    monkeypatch.chdir(tmp_path)
    argv = ["benchmark", "--suite", "gpu", "--scan-arch", "resnet_tiny", "--precision", "fp16", "--photos", "7"]
    assert cli.main(argv) == 0
    (options,) = received
    assert (options.arch, options.precision, options.photos) == ("resnet_tiny", "fp16", 7)
    written = json.loads((tmp_path / "benchmark-gpu.json").read_text())
    assert written["suite"] == "gpu" and written["gpu"]["options"]["photos"] == 7
    assert "gpu: recorded" in capsys.readouterr().out


# ---- the pre-refactor command line (tests/cli_before_refactor.py, frozen at 5146f42) ----------------------
# Old command lines and jobs/*.py must keep working: every old option string, what it takes, and the value
# each dest gets when only the required arguments are given. The new parser keeps the old spellings of values
# (comma lists such as --split and --amount as text, --storage-option as a list), so nothing is mapped.
OLD_COMMANDS = [name for name in OLD_CLI if name]


def _parser_of(command: str) -> argparse.ArgumentParser:
    return subparsers()[command] if command else cli.build_parser()


def _by_option_string(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: action for action in parser._actions for flag in action.option_strings}


def _parsed(command: str, *extra: str) -> dict:
    """The namespace of the old required arguments (plus ``extra``), lists as tuples like the frozen record."""
    argv = [command, *OLD_CLI[command]["argv"], *extra] if command else ["demo"]
    namespace = vars(cli.build_parser().parse_args(argv))
    return {k: tuple(v) if isinstance(v, list) else v for k, v in namespace.items()}


def test_the_old_commands_all_exist_and_the_record_parses_what_required_parses():
    assert set(OLD_COMMANDS) <= set(cli.COMMANDS)
    for command in OLD_COMMANDS:
        assert OLD_CLI[command]["argv"] == tuple(REQUIRED[command][0]), command


@pytest.mark.parametrize("command", list(OLD_CLI))
def test_every_old_option_string_still_exists_and_takes_what_it_took(command):
    parser = _parser_of(command)
    actions = _by_option_string(parser)
    missing = sorted(set(OLD_CLI[command]["options"]) - set(actions))
    assert not missing, f"{command}: old flags gone: {missing}"
    for flag, old in OLD_CLI[command]["options"].items():
        new = actions[flag]
        assert new.nargs == old["nargs"], f"{command} {flag}: takes a different number of values"
        assert not new.required or old.get("required"), f"{command} {flag}: required now, optional before"
        if "choices" in old:
            assert set(old["choices"]) <= set(new.choices or ()), f"{command} {flag}: old choices refused"
    positionals = tuple((a.dest, a.nargs) for a in parser._actions if not a.option_strings and a.dest != "command")
    assert positionals == OLD_CLI[command]["positionals"]


@pytest.mark.parametrize("command", list(OLD_CLI))
def test_the_required_arguments_alone_give_every_old_option_its_old_value(command):
    parsed = _parsed(command)
    actions = _by_option_string(_parser_of(command))
    for flag, old in OLD_CLI[command]["options"].items():
        expected = OLD_CLI[command]["parsed"][old["dest"]]
        assert parsed[actions[flag].dest] == expected, f"{command} {flag}"


@pytest.mark.parametrize("command", list(OLD_CLI))
def test_old_defaults_are_the_new_actions_defaults(command):
    """Per action, not only per dest: a job that reads ``parser.get_default`` or ``--help`` sees the old default.
    Skipped: ``None`` defaults (checked through the parsed values above), and the second flag of a pair sharing
    a dest (train's ``--cpu`` stores ``True`` as its own default, which argparse never applies: ``--gpu``'s
    ``None`` comes first)."""
    actions = _by_option_string(_parser_of(command))
    for flag, old in OLD_CLI[command]["options"].items():
        default = old["default"]
        if default is None or OLD_CLI[command]["parsed"][old["dest"]] != default:
            continue
        new = actions[flag].default
        assert (tuple(new) if isinstance(new, list) else new) == default, f"{command} {flag}"


OLD_FLAGS_WITHOUT_VALUE = [
    (command, flag)
    for command, record in OLD_CLI.items()
    for flag, old in record["options"].items()
    if old["nargs"] == 0
]


@pytest.mark.parametrize(("command", "flag"), OLD_FLAGS_WITHOUT_VALUE)
def test_each_old_flag_without_a_value_still_sets_its_old_constant(command, flag):
    old = OLD_CLI[command]["options"][flag]
    parsed = _parsed(command, flag) if command else vars(cli.build_parser().parse_args([flag, "demo"]))
    assert parsed[_by_option_string(_parser_of(command))[flag].dest] == old["const"]
