"""cluster.ini -> frozen dataclasses, validated on load.

Lookup order: ``--config``, ``$CLUSTER_CONFIG``, ``./cluster.ini``, built-in
defaults.  ``$CLUSTER_DATA_DIR`` and ``$CLUSTER_STATE_DIR`` override the two
directories.  Every problem is reported as one :class:`ConfigError` naming the
file, section, key, value and what is allowed.
"""

from __future__ import annotations

import configparser
import dataclasses
import os
import re
import stat
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from controller.errors import ConfigError

CONFIG_ENV = "CLUSTER_CONFIG"
DATA_DIR_ENV = "CLUSTER_DATA_DIR"
STATE_DIR_ENV = "CLUSTER_STATE_DIR"
BUILTIN = "<built-in defaults>"


def _opt(
    default, help: str, *, choices=None, min=None, max=None, factory=None, path=False, pattern=None, zero_is_off=False
):
    """A config field: its default, its help line and what values are allowed (``path``: a file name;
    ``pattern``: (regular expression the whole value must match, what it allows in words); ``zero_is_off``:
    0 turns the feature off and is allowed besides ``min`` to ``max``)."""
    meta = {
        "help": help,
        "choices": choices,
        "min": min,
        "max": max,
        "path": path,
        "pattern": pattern,
        "zero_is_off": zero_is_off,
    }
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


PROVIDERS = ("local", "ssh", "aws")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("onecycle", "constant")
DEVICES = ("auto", "cpu", "cuda")
# the name becomes directories on the master and the slaves and a run dir that `stop` removes there:
# no path separators, dots, spaces or shell characters
NAME_PATTERN = (
    r"[a-z0-9][a-z0-9-]{0,39}",
    "lower-case letters, digits and '-', 1 to 40 characters, not starting with '-'",
)
# a directory on a slave, as the slave sees it: absolute or under the slave user's home (~)
SLAVE_DIR_PATTERN = (
    r"(~|~/[A-Za-z0-9_./+-]*|/[A-Za-z0-9_./+-]*)",
    "a path on the slave: absolute or under ~ (letters, digits, '_./+-')",
)
SLAVE_DATA_HELP = (
    "where the slaves' engines keep data sets (a path on the slave; ~ = the slave user's home); "
    "filled over SFTP from the master's data_dir"
)
# a program on the slave (a path or a name on its PATH), never a shell fragment
PROGRAM_PATTERN = (r"[A-Za-z0-9_./+-]+", "a program name or absolute path (letters, digits, '_./+-')")


# a base URL the engines GET /latest/... under: http(s), a host (name, IPv4 or [IPv6]) and an optional port/path
METADATA_URL_PATTERN = (
    r"|off|https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~-]+)*/?|https?://\[[0-9a-fA-F:]+\](:[0-9]{1,5})?",
    "empty (the provider's default), off, or an http:// URL such as http://169.254.169.254",
)


@dataclass(frozen=True)
class ClusterConfig:
    name: str = _opt("default", "name of the cluster; tags its nodes and rows in the store", pattern=NAME_PATTERN)
    provider: str = _opt("local", "where slaves run", choices=PROVIDERS)
    slaves: int = _opt(4, "number of slaves (local: engines) that `cluster start` brings up", min=1, max=256)
    data_dir: Path = _opt(Path("~/.cache/cluster/data"), "where MNIST lives (torchvision layout: DATA_DIR/MNIST/raw)")
    state_dir: Path = _opt(Path(".cluster"), "the SQLite store, checkpoints, the ipyparallel profile, keys")
    threads_per_engine: int = _opt(
        0, "torch threads per engine; 0 = cores / engines (never oversubscribe)", min=0, max=512
    )
    download: bool = _opt(True, "download MNIST into data_dir when it is missing (needs internet)")
    engine_timeout: int = _opt(120, "seconds to wait for engines to register", min=5, max=3600)
    master_grace_minutes: float = _opt(
        10.0, "minutes engines wait for a silent master (a sleeping laptop) before they quit", min=0.1, max=1440.0
    )
    stall_minutes: float = _opt(
        10.0,
        "a training task that reports no progress for this long (a hung CUDA kernel "
        "or NCCL call, a deadlock) has its engine killed and goes on from its "
        "checkpoint on another engine (an inference shard too; a data-parallel run "
        "has every rank killed and fails, resumable); 0 = never",
        min=0.25,
        max=1440.0,
        zero_is_off=True,
    )
    price_per_hour: float = _opt(0.0, "$/hour of the whole local or ssh cluster, for cost reports", min=0.0)
    metadata_url: str = _opt(
        "",
        "instance metadata service the engines watch for spot interruption notices; "
        "empty = the provider's (aws: http://169.254.169.254, local/ssh: none), off = none",
        pattern=METADATA_URL_PATTERN,
    )
    replace_lost: bool = _opt(
        True,
        "replace a slave whose engines died, whose instance ended or that failed its "
        "health check, and one under a spot notice (the cluster keeps its size)",
    )
    min_slaves: int = _opt(1, "autoscaling: idle slaves are turned off down to this many", min=0, max=256)
    max_slaves: int = _opt(
        0,
        "autoscaling: slaves are turned on for waiting jobs up to this many; 0 = no "
        "autoscaling (the cluster keeps the size `start`/`scale` gave it)",
        min=0,
        max=256,
    )
    idle_minutes: float = _opt(
        10.0, "autoscaling: a slave idle this long is turned off (fractions allowed)", min=0.0, max=10080.0
    )
    drain_timeout: int = _opt(600, "seconds `scale`/`remove` wait for drained slaves' tasks to stop", min=1, max=86400)


@dataclass(frozen=True)
class TrainingConfig:
    epochs: int = _opt(1, "epochs per run", min=1, max=10000)
    lr: float = _opt(0.01, "learning rate (the peak rate of the one-cycle schedule)", min=0.0, max=100.0)
    l1: float = _opt(
        0.0,
        "L1 penalty lambda, as the paper scales it: each batch's loss += lambda * sum(|w|) / training batches "
        "per epoch",
        min=0.0,
    )
    batch_size: int = _opt(128, "mini-batch size", min=1, max=65536)
    optimizer: str = _opt("adam", "optimizer", choices=OPTIMIZERS)
    momentum: float = _opt(0.9, "SGD momentum (ignored by adam)", min=0.0, max=1.0)
    schedule: str = _opt("onecycle", "learning-rate schedule", choices=SCHEDULES)
    seed: int = _opt(0, "random seed: same seed, same device -> same result", min=0)
    device: str = _opt("auto", "torch device on the engine; auto = cuda when there is one", choices=DEVICES)
    conv1: int = _opt(20, "filters of the first convolution", min=1, max=1024)
    conv2: int = _opt(40, "filters of the second convolution", min=1, max=1024)
    hidden: int = _opt(100, "units of the fully connected hidden layer", min=1, max=65536)
    subset: int = _opt(0, "train on the first N training images only; 0 = all 50,000", min=0, max=50000)
    task_seconds: float = _opt(
        60.0,
        "a task ends after this many seconds (at a batch boundary, with a checkpoint "
        "that resumes mid-epoch) or at its epoch's end; 0 = whole epochs",
        min=0.0,
    )
    checkpoint_minutes: float = _opt(
        0.0,
        "engines keep a run's checkpoint and ship it to the master this often "
        "(and on a drain, a spot notice and at the end); 0 = after every task",
        min=0.0,
    )


# where each provider's engines find an instance metadata service by default ([cluster] metadata_url = "")
PROVIDER_METADATA_URL = {"aws": "http://169.254.169.254"}


def metadata_url(cluster: ClusterConfig, provider: str) -> str:
    """The metadata service the engines of ``provider`` watch for spot notices; "" = none."""
    if cluster.metadata_url == "off":
        return ""
    return cluster.metadata_url or PROVIDER_METADATA_URL.get(provider, "")


# the [training] keys that say how a run is cut into tasks, not what it trains: a resumed run or sweep
# takes them from the current configuration, not from when it started
TASK_KEYS = ("task_seconds", "checkpoint_minutes")


def task_keys(training: TrainingConfig) -> dict:
    return {key: getattr(training, key) for key in TASK_KEYS}


@dataclass(frozen=True)
class SshConfig:
    hosts: tuple = _opt(
        (),
        "slaves you already own: host or host:port, comma separated, each machine once "
        "(engines_per_host sets its engines)",
        factory=tuple,
    )
    user: str = _opt("", "SSH user on the slaves; empty = the current user")
    key_file: str = _opt("", "private key for the slaves; empty = SSH agent / default keys", path=True)
    known_hosts: str = _opt(
        "", "known_hosts file; empty = STATE_DIR/known_hosts (recorded on first contact)", path=True
    )
    engines_per_host: int = _opt(1, "engines started on every host", min=1, max=64)
    python: str = _opt("python3", "Python on the slaves used to create the engine environment", pattern=PROGRAM_PATTERN)
    remote_dir: str = _opt("~/.cluster-engine", "directory on the slaves for the engine environment")
    data_dir: str = _opt("~/.cache/cluster/data", SLAVE_DATA_HELP, pattern=SLAVE_DIR_PATTERN)
    tunnel: str = _opt(
        "never",
        "engines reach the controller through SSH reverse tunnels (always) or directly (never)",
        choices=("always", "never"),
    )


@dataclass(frozen=True)
class AwsConfig:
    region: str = _opt("us-east-1", "AWS region")
    instance_types: tuple = _opt(
        ("g4dn.xlarge",), "instance types, in order of preference", factory=lambda: ("g4dn.xlarge",)
    )
    max_spot_price: float = _opt(0.0, "highest $/hour per instance; 0 = up to the on-demand price", min=0.0)
    ami: str = _opt("auto", "AMI id, or auto = a current GPU deep-learning AMI")
    key_name: str = _opt("", "EC2 key pair; empty = create one per cluster")
    key_file: str = _opt("", "private key of key_name; empty = STATE_DIR/keys when created", path=True)
    subnet: str = _opt("", "subnet id; empty = the default VPC's subnets")
    security_group: str = _opt("", "security group id; empty = create one per cluster")
    min_slaves: int = _opt(0, "accept partial capacity down to this many; 0 = all requested", min=0, max=256)
    on_demand_fallback: bool = _opt(False, "fall back to on-demand when spot capacity is short")
    engines_per_gpu: int = _opt(1, "engines per GPU (the paper ran up to 16)", min=1, max=64)
    endpoint_url: str = _opt("", "EC2 endpoint; empty = AWS (tests point this at moto)")
    tunnel: str = _opt("auto", "reach the controller through SSH reverse tunnels", choices=("auto", "always", "never"))
    ssh_user: str = _opt("ubuntu", "login user of the AMI")
    ssh_from: str = _opt("auto", "CIDR allowed to SSH to the slaves; auto = this master's public address/32")
    remote_dir: str = _opt("~/.cluster-engine", "directory on the slaves for the engine environment")
    data_dir: str = _opt("~/.cache/cluster/data", SLAVE_DATA_HELP, pattern=SLAVE_DIR_PATTERN)
    python: str = _opt("python3", "Python on the AMI that runs the engines", pattern=PROGRAM_PATTERN)


@dataclass(frozen=True)
class Config:
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    ssh: SshConfig = field(default_factory=SshConfig)
    aws: AwsConfig = field(default_factory=AwsConfig)
    source: str = BUILTIN

    @property
    def state_dir(self) -> Path:
        return self.cluster.state_dir

    @property
    def data_dir(self) -> Path:
        return self.cluster.data_dir


SECTIONS: dict[str, type] = {
    "cluster": ClusterConfig,
    "training": TrainingConfig,
    "ssh": SshConfig,
    "aws": AwsConfig,
}


def describe_allowed(f: dataclasses.Field, kind: type) -> str:
    m = f.metadata
    if m.get("choices"):
        return "one of " + ", ".join(m["choices"])
    if m.get("pattern"):
        return m["pattern"][1]
    if kind is bool:
        return "true or false"
    name = {int: "an integer", float: "a number", tuple: "a comma-separated list", Path: "a path", str: "text"}[kind]
    lo, hi = m.get("min"), m.get("max")
    if m.get("zero_is_off"):
        return f"0 (off) or {name} from {lo} to {hi}"
    if lo is not None and hi is not None:
        return f"{name} from {lo} to {hi}"
    if lo is not None:
        return f"{name} >= {lo}"
    return name


def parse_value(raw: str, f: dataclasses.Field, kind: type, where: str):
    """Turn one raw string into a typed, checked value; ``where`` prefixes errors."""
    text = raw.strip()

    def bad(reason: str = "") -> ConfigError:
        extra = f" ({reason})" if reason else ""
        return ConfigError(f"{where} = {raw!r}: expected {describe_allowed(f, kind)}{extra}")

    if kind is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise bad()
    value: Any
    if kind is int:
        try:
            value = int(text)
        except ValueError:
            raise bad() from None
    elif kind is float:
        try:
            value = float(text)
        except ValueError:
            raise bad() from None
        if value != value or value in (float("inf"), float("-inf")):
            raise bad("not a finite number")
    elif kind is tuple:
        return tuple(item.strip() for item in text.split(",") if item.strip())
    elif kind is Path:
        return Path(text).expanduser() if text else Path("")
    else:
        value = text
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise bad()
    pattern = f.metadata.get("pattern")
    if pattern and not re.fullmatch(pattern[0], str(value)):
        raise bad()
    lo, hi = f.metadata.get("min"), f.metadata.get("max")
    if f.metadata.get("zero_is_off") and value == 0:
        return value
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise bad("out of range")
    return value


def field_kinds(cls: type) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _section_from(cls: type, items: dict[str, str], source: str, section: str, base: Path):
    kinds = field_kinds(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, raw in items.items():
        if key not in fields:
            allowed = ", ".join(fields)
            raise ConfigError(f"{source}: [{section}] unknown key {key!r}; allowed keys: {allowed}")
        value = parse_value(raw, fields[key], kinds[key], f"{source}: [{section}] {key}")
        if kinds[key] is Path and value != Path("") and not value.is_absolute():
            value = base / value
        elif fields[key].metadata.get("path") and value and not Path(value).expanduser().is_absolute():
            value = str(base / value)  # an optional path (empty = unset): relative to the file too
        values[key] = value
    return cls(**values)


def find_config_file(explicit: str | os.PathLike | None = None, cwd: Path | None = None) -> Path | None:
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(f"--config {explicit}: no such file; give the path of an existing cluster.ini")
        return path
    env = os.environ.get(CONFIG_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise ConfigError(f"${CONFIG_ENV}={env}: no such file; unset it or point it at a cluster.ini")
        return path
    local = (cwd or Path.cwd()) / "cluster.ini"
    return local if local.is_file() else None


def refuse_writable_by_others(path: Path) -> None:
    """A configuration names programs run on the slaves and directories removed there: whoever may
    write it may run code as this user, so it must be writable by its owner alone."""
    mode = path.stat().st_mode
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(
            f"{path}: writable by group or others (mode {stat.S_IMODE(mode):04o}); anyone who "
            f"can edit it can run commands as you on the slaves. Fix: chmod go-w {path}"
        )


def load_config(explicit: str | os.PathLike | None = None, *, environ: dict | None = None) -> Config:
    """Find, read and validate the configuration; raise ConfigError on any problem."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    path = find_config_file(explicit)
    sections: dict[str, Any] = {}
    source = BUILTIN
    base = Path.cwd()
    if path is not None:
        source = str(path)
        refuse_writable_by_others(path)
        base = path.resolve().parent
        parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";", "#"))
        parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive, as fields are
        try:
            parser.read(path, encoding="utf-8")
        except configparser.Error as exc:
            raise ConfigError(f"{source}: not a valid INI file: {exc}") from None
        for name in parser.sections():
            if name not in SECTIONS:
                raise ConfigError(f"{source}: unknown section [{name}]; allowed sections: {', '.join(SECTIONS)}")
            sections[name] = _section_from(SECTIONS[name], dict(parser[name]), source, name, base)
    config = Config(**sections, source=source)
    return apply_environment(config, env, base)


def apply_environment(config: Config, environ, base: Path) -> Config:
    """Environment overrides (relative to the cwd); other relative paths are relative to ``base``."""
    cluster = config.cluster
    data_dir = (base / cluster.data_dir.expanduser()).resolve()
    state_dir = (base / cluster.state_dir.expanduser()).resolve()
    if environ.get(DATA_DIR_ENV):
        data_dir = Path(environ[DATA_DIR_ENV]).expanduser().resolve()
    if environ.get(STATE_DIR_ENV):
        state_dir = Path(environ[STATE_DIR_ENV]).expanduser().resolve()
    cluster = dataclasses.replace(cluster, data_dir=data_dir, state_dir=state_dir)
    return dataclasses.replace(config, cluster=cluster)


def override(section, source: str, **values):
    """Apply command-line overrides to a section, validated like the file."""
    fields = {f.name: f for f in dataclasses.fields(section)}
    kinds = field_kinds(type(section))
    checked = {}
    for key, value in values.items():
        if value is None:
            continue
        raw = ",".join(value) if isinstance(value, (list, tuple)) else str(value)
        checked[key] = parse_value(raw, fields[key], kinds[key], f"{source} --{key.replace('_', '-')}")
    return dataclasses.replace(section, **checked)


def config_to_dict(config: Config) -> dict:
    """The whole configuration as plain JSON values (the keeper process gets exactly the caller's)."""
    out: dict = {"source": config.source}
    for name in SECTIONS:
        section = getattr(config, name)
        out[name] = {
            f.name: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
            for f in dataclasses.fields(section)
            for v in [getattr(section, f.name)]
        }
    return out


def config_from_dict(data: dict) -> Config:
    """The inverse of ``config_to_dict``."""
    sections = {}
    for name, cls in SECTIONS.items():
        kinds = field_kinds(cls)
        values = {}
        for key, value in data.get(name, {}).items():
            if key not in kinds:
                raise ConfigError(f"saved configuration: [{name}] unknown key {key!r}")
            values[key] = Path(value) if kinds[key] is Path else tuple(value) if kinds[key] is tuple else value
        sections[name] = cls(**values)
    return Config(**sections, source=data.get("source", BUILTIN))


def render_default_ini() -> str:
    """The documented default cluster.ini, generated from the dataclasses."""
    lines = [
        "; Default configuration of `cluster`. Every key is shown with its default.",
        "; Lookup order: --config, $CLUSTER_CONFIG, ./cluster.ini, built-in defaults.",
        "; $CLUSTER_DATA_DIR and $CLUSTER_STATE_DIR override data_dir and state_dir.",
        "; Relative paths are relative to this file.",
    ]
    for name, cls in SECTIONS.items():
        lines.append("")
        lines.append(f"[{name}]")
        kinds = field_kinds(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            allowed = describe_allowed(f, kinds[f.name])
            lines.append(f"; {f.metadata['help']} ({allowed})")
            if isinstance(default, tuple):
                text = ", ".join(default)
            elif isinstance(default, bool):
                text = str(default).lower()
            elif isinstance(default, Path):
                text = "" if default == Path("") else str(default)
            else:
                text = str(default)
            lines.append(f"{f.name} = {text}".rstrip())
    return "\n".join(lines) + "\n"
