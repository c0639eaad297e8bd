"""Configuration: lookup order, overrides, and one clear message (exit 2) for every bad value."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from controller.cli import main
from controller.config import Config, load_config, render_default_ini
from controller.errors import ConfigError, ExitStatus
from tests.helpers import cluster_pids

REPO = Path(__file__).resolve().parent.parent


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_the_shipped_cluster_ini_documents_every_key_with_its_default():
    assert (REPO / "cluster.ini").read_text() == render_default_ini()
    shipped = load_config(REPO / "cluster.ini", environ={})
    builtin = Config()
    assert shipped.training == builtin.training
    assert shipped.aws == builtin.aws and shipped.ssh == builtin.ssh


def test_builtin_defaults_apply_without_any_file(isolated, monkeypatch):
    monkeypatch.delenv("CLUSTER_STATE_DIR")
    monkeypatch.delenv("CLUSTER_DATA_DIR")
    config = load_config()
    assert config.source == "<built-in defaults>"
    assert config.cluster.provider == "local" and config.cluster.slaves == 4
    assert config.state_dir == (isolated / ".cluster").resolve()


def test_lookup_order_is_flag_then_environment_then_cwd(isolated, monkeypatch):
    (isolated / "cluster.ini").write_text("[cluster]\nslaves = 3\n")
    env_file = isolated / "env.ini"
    env_file.write_text("[cluster]\nslaves = 5\n")
    flag_file = isolated / "flag.ini"
    flag_file.write_text("[cluster]\nslaves = 7\n")
    assert load_config().cluster.slaves == 3
    monkeypatch.setenv("CLUSTER_CONFIG", str(env_file))
    assert load_config().cluster.slaves == 5
    assert load_config(flag_file).cluster.slaves == 7


def test_environment_overrides_the_two_directories(isolated, monkeypatch, tmp_path):
    (isolated / "cluster.ini").write_text("[cluster]\nstate_dir = from-file\ndata_dir = data-from-file\n")
    monkeypatch.setenv("CLUSTER_STATE_DIR", str(tmp_path / "s"))
    monkeypatch.setenv("CLUSTER_DATA_DIR", str(tmp_path / "d"))
    config = load_config()
    assert config.state_dir == tmp_path / "s" and config.data_dir == tmp_path / "d"


def test_relative_paths_in_a_file_are_relative_to_that_file(isolated, monkeypatch, tmp_path):
    monkeypatch.delenv("CLUSTER_STATE_DIR")
    folder = tmp_path / "conf"
    folder.mkdir()
    (folder / "c.ini").write_text("[cluster]\nstate_dir = st\n")
    assert load_config(folder / "c.ini").state_dir == (folder / "st").resolve()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[cluster]\nslaves = four\n", "[cluster] slaves = 'four': expected an integer from 1 to 256"),
        ("[cluster]\nslaves = 0\n", "[cluster] slaves = '0': expected an integer from 1 to 256 (out of range)"),
        ("[cluster]\nprovider = gce\n", "[cluster] provider = 'gce': expected one of local, ssh, aws"),
        ("[cluster]\nslavez = 2\n", "[cluster] unknown key 'slavez'; allowed keys: name, provider, slaves"),
        ("[clutser]\nslaves = 2\n", "unknown section [clutser]; allowed sections: cluster, training"),
        ("[training]\nlr = fast\n", "[training] lr = 'fast': expected a number from 0.0 to 100.0"),
        ("[training]\nlr = nan\n", "[training] lr = 'nan': expected a number from 0.0 to 100.0 (not a finite number)"),
        ("[training]\noptimizer = rmsprop\n", "[training] optimizer = 'rmsprop': expected one of adam, sgd"),
        ("[cluster]\ndownload = maybe\n", "[cluster] download = 'maybe': expected true or false"),
        ("[aws]\ntunnel = sometimes\n", "[aws] tunnel = 'sometimes': expected one of auto, always, never"),
        ("slaves = 2\n", "not a valid INI file"),
        # a hung-task limit shorter than a task's set-up would kill every engine
        (
            "[cluster]\nstall_minutes = 0.01\n",
            "[cluster] stall_minutes = '0.01': expected 0 (off) or a number from 0.25 to 1440.0 (out of range)",
        ),
    ],
)
def test_each_bad_value_gets_one_clear_message_and_exit_2(isolated, text, expected):
    path = isolated / "bad.ini"
    path.write_text(text)
    code, out, err = run_cli("--config", str(path), "start")
    assert code == ExitStatus.USAGE == 2
    assert str(path) in err and expected in err
    assert out == ""
    assert not (isolated / "state").exists(), "nothing may be started or created on a bad config"


@pytest.mark.parametrize("value", ["0", "0.25", "10"])
def test_stall_minutes_is_off_at_0_or_at_least_a_quarter_minute(isolated, value):
    path = isolated / "c.ini"
    path.write_text(f"[cluster]\nstall_minutes = {value}\n")
    assert load_config(path).cluster.stall_minutes == float(value)


def test_an_ssh_slave_listed_twice_is_refused_before_anything_starts(isolated):
    path = isolated / "c.ini"
    path.write_text("[cluster]\nprovider = ssh\n\n[ssh]\nhosts = gpu1, gpu2, gpu1:22\n")
    code, out, err = run_cli("--config", str(path), "start")
    assert code == ExitStatus.USAGE
    assert "[ssh] hosts names one slave twice ('gpu1' and 'gpu1:22'); list each slave once" in err, err
    assert not cluster_pids(isolated / "state"), "a refused start leaves nothing running"


def test_a_missing_config_file_is_named(isolated):
    code, _, err = run_cli("--config", "nope.ini", "status")
    assert code == 2 and "--config nope.ini: no such file" in err


def test_a_missing_environment_config_file_is_named(isolated, monkeypatch):
    monkeypatch.setenv("CLUSTER_CONFIG", "gone.ini")
    with pytest.raises(ConfigError, match=r"\$CLUSTER_CONFIG=gone.ini: no such file"):
        load_config()


def test_command_line_values_are_validated_like_the_file(isolated):
    code, _, err = run_cli("start", "--slaves", "0")
    assert code == 2 and "cluster start --slaves = '0': expected an integer from 1 to 256" in err
    code, _, err = run_cli("start", "--provider", "azure")
    assert code == 2 and "expected one of local, ssh, aws" in err
    assert not (isolated / "state" / "profile").exists()


def test_unknown_commands_and_flags_are_usage_errors(isolated, capsys):
    assert run_cli("explode")[0] == 2
    assert run_cli("train", "--learning-rate", "1")[0] == 2


def test_optional_key_paths_in_a_file_are_relative_to_that_file(isolated, tmp_path):
    folder = tmp_path / "conf"
    folder.mkdir()
    (folder / "c.ini").write_text("[ssh]\nkey_file = keys/id_ed25519\nknown_hosts =\n[aws]\nkey_file = /abs/key\n")
    config = load_config(folder / "c.ini")
    assert config.ssh.key_file == str(folder.resolve() / "keys" / "id_ed25519")
    assert config.ssh.known_hosts == "" and config.aws.key_file == "/abs/key"


@pytest.mark.parametrize("name", ["../../x", "a/b", "x y", "$(id)", "Upper", "-lead", "x" * 41, ""])
def test_a_cluster_name_that_could_reach_paths_or_shells_is_refused(isolated, name):
    path = isolated / "bad.ini"
    path.write_text(f"[cluster]\nname = {name}\n")
    code, out, err = run_cli("--config", str(path), "status")  # status: a regression must not start anything
    assert code == ExitStatus.USAGE
    assert f"{path}: [cluster] name = {name!r}: expected lower-case letters, digits and '-'" in err
    assert not (isolated / "state").exists()


@pytest.mark.parametrize("section", ["ssh", "aws"])
@pytest.mark.parametrize("python", ["python3; rm -rf ~", "$(id)", "python3 -c x", "`id`"])
def test_a_slave_python_that_is_a_shell_fragment_is_refused(isolated, section, python):
    path = isolated / "bad.ini"
    path.write_text(f"[{section}]\npython = {python}\n")
    code, _, err = run_cli("--config", str(path), "status")
    assert code == ExitStatus.USAGE
    assert f"[{section}] python = {python!r}: expected a program name or absolute path" in err


def test_valid_names_and_programs_are_accepted(isolated):
    path = isolated / "ok.ini"
    path.write_text("[cluster]\nname = lab-2\n[ssh]\npython = /opt/conda/bin/python3.11\n")
    config = load_config(path)
    assert config.cluster.name == "lab-2" and config.ssh.python == "/opt/conda/bin/python3.11"


@pytest.mark.parametrize("mode", [0o664, 0o646])
def test_a_cluster_ini_writable_by_others_is_refused_with_the_fix(isolated, mode):
    ini = isolated / "cluster.ini"
    ini.write_text("[cluster]\nslaves = 2\n")
    ini.chmod(mode)
    code, out, err = run_cli("status")
    assert code == ExitStatus.USAGE
    assert f"{ini}: writable by group or others (mode {mode:04o})" in err and f"chmod go-w {ini}" in err
    ini.chmod(0o644)
    assert run_cli("status")[0] == 0
