import ast
from pathlib import Path

import pytest

from adapters.config_files import load_config
from fl_core.config.model import ConfigError
from fl_core.config.overrides import apply_overrides

ROOT = Path(__file__).resolve().parents[3]


def test_defaults_load_from_params_yaml() -> None:
    cfg = load_config(ROOT / "params.yaml")
    assert cfg.model == "logreg"
    assert cfg.data.partition == "by_site"
    assert cfg.data.features[0] == "age"


def test_overrides_are_typed_and_nested() -> None:
    cfg = load_config(ROOT / "params.yaml",
                      ["rounds=5", "model=mlp", "data.partition=by_patient",
                       "data.dirichlet_alpha=0.5", "gate.min_accuracy=0.7"])
    assert cfg.rounds == 5 and isinstance(cfg.rounds, int)
    assert cfg.model == "mlp"
    assert cfg.data.partition == "by_patient"
    assert cfg.data.dirichlet_alpha == 0.5
    assert cfg.gate.min_accuracy == 0.7


def test_bad_literal_names_key_and_accepted_values() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "params.yaml", ["model=cnn"])
    msg = str(err.value)
    assert "model" in msg and "'logreg'" in msg and "'mlp'" in msg and "cnn" in msg


def test_unknown_key_lists_accepted_keys() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "params.yaml", ["data.partitoin=by_site"])
    msg = str(err.value)
    assert "data.partitoin" in msg and "unknown key" in msg and "partition" in msg


def test_unknown_top_level_key() -> None:
    with pytest.raises(ConfigError, match="roundz: unknown key"):
        load_config(ROOT / "params.yaml", ["roundz=3"])


@pytest.mark.parametrize("item, fragment", [
    ("rounds=0", "rounds"),
    ("rounds=many", "rounds"),
    ("learning_rate=-1", "learning_rate"),
    ("data.test_fraction=1.5", "data.test_fraction"),
    ("data.features=[age, shoe_size]", "shoe_size"),
    ("noequals", "key=value"),
    ("compression.bits=9", "compression.bits: Input should be less than or equal to 8"),
    ("compression.ratio=0", "compression.ratio: Input should be greater than 0"),
    ("compression.downlink=gzip", "compression.downlink.*'dense'.*'compressed'"),
    ("compression.momentum=1.0", "compression.momentum"),
])
def test_bad_values_name_the_key(item: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_config(ROOT / "params.yaml", [item])


def test_override_cannot_descend_into_a_scalar() -> None:
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"rounds": 3}, ["rounds.x=1"])


def test_malformed_yaml_file(tmp_path: Path) -> None:
    bad = tmp_path / "params.yaml"
    bad.write_text("rounds: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_flat_params_are_dotted() -> None:
    flat = load_config(ROOT / "params.yaml").flat()
    assert flat["data.partition"] == "by_site"
    assert flat["audit.max_auc"] == 0.6 and flat["privacy.epsilon"] == 1.0


@pytest.mark.parametrize("item, fragment", [
    ("seed=123456789012345678901", "seed: Input should be less than or equal to 4294967295"),
    (f"seed={2**32}", "seed: Input should be less than or equal to 4294967295"),
    ("seed=-1", "seed: Input should be greater than or equal to 0"),
    ("batch_size=100000000000000000000", "batch_size: Input should be less than or equal"),
    ("min_clients=1001", "min_clients: Input should be less than or equal to 1000"),
    ("compression.chunk_size=99999999999", "compression.chunk_size"),
    ("aggregation.bucket_size=5000", "aggregation.bucket_size"),
    ("audit.population_size=10000000000000", "audit.population_size"),
    ("privacy.lifetime_epsilon=.inf", "privacy.lifetime_epsilon: Input should be a finite"),
    ("aggregation.max_norm_factor=.nan", "aggregation.max_norm_factor: Input should be a finite"),
])
def test_values_that_cannot_work_are_refused_at_load(item: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_config(ROOT / "params.yaml", [item])


def test_seed_bound_is_accepted_by_torch_and_numpy() -> None:
    import numpy as np
    import torch

    from fl_core.config.model import MAX_SEED

    cfg = load_config(ROOT / "params.yaml", [f"seed={MAX_SEED}"])
    assert cfg.seed == 2**32 - 1
    # the largest derived seed (audit shadows: seed + 1000 + shadow) still seeds both
    torch.Generator().manual_seed(cfg.seed + 1000 + 256)
    np.random.default_rng(cfg.seed + 1000 + 256)
    np.random.RandomState(cfg.seed)  # the legacy API's limit is the bound itself


def test_min_clients_above_num_clients_refused_for_by_patient() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "params.yaml",
                    ["data.partition=by_patient", "data.num_clients=4", "min_clients=5"])
    assert "min_clients=5 exceeds the 4 clients (data.num_clients)" in str(err.value)
    cfg = load_config(ROOT / "params.yaml",
                      ["data.partition=by_patient", "data.num_clients=5", "min_clients=5"])
    assert cfg.min_clients == 5
    # by_site: the number of sites is known only from the data (the partition stage refuses)
    assert load_config(ROOT / "params.yaml", ["min_clients=5"]).min_clients == 5


def test_min_clients_above_the_sites_refused_at_partition(project: Path) -> None:
    from adapters.partition import partition_data
    from adapters.validate import validate_data

    cfg = load_config(project / "params.yaml", ["min_clients=5"])
    validate_data(cfg, project)
    with pytest.raises(ConfigError) as err:
        partition_data(cfg, project)
    msg = str(err.value)
    assert "min_clients=5 exceeds the 4 clients" in msg and "by_site" in msg
    assert not (project / "data" / "processed" / "partition.json").exists()
    partition_data(load_config(project / "params.yaml", ["min_clients=4"]), project)
    assert (project / "data" / "processed" / "partition.json").exists()


def _config_defaults(section: type, out: dict[str, set[str]]) -> dict[str, set[str]]:
    """Config key (its last part) → repr of its defaults, over every section of the model."""
    from pydantic import BaseModel

    for name, field in section.model_fields.items():
        if name == "spec":  # the dataset schema: a model of its own, fl_core/data/schema.py
            continue
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            _config_defaults(field.annotation, out)
        elif not field.is_required() and field.default is not None:
            out.setdefault(name, set()).add(repr(field.default))
    return out


# where a default may be written: the models themselves, and records of what a stage did
DEFAULTS_HOME = {"fl_core/config/model.py", "fl_core/data/schema.py", "fl_core/results.py"}


def _literal_defaults(tree: ast.AST) -> list[tuple[str, ast.expr]]:
    """(name, default) of every function parameter and class-level field with a default."""
    out: list[tuple[str, ast.expr]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            a = node.args
            positional = [*a.posonlyargs, *a.args]
            out += [(p.arg, d) for p, d in zip(positional[len(positional) - len(a.defaults):],
                                               a.defaults, strict=True)]
            out += [(p.arg, d) for p, d in zip(a.kwonlyargs, a.kw_defaults, strict=True)
                    if d is not None]
        elif isinstance(node, ast.ClassDef):
            out += [(s.target.id, s.value) for s in node.body if isinstance(s, ast.AnnAssign)
                    and isinstance(s.target, ast.Name) and s.value is not None]
    return out


def test_every_config_default_is_written_once_in_the_config_model() -> None:
    """A parameter or field named like a config key does not repeat the key's default as a
    literal (``ratio: float = 0.1``): it reads the model's field
    (``CompressionConfig.model_fields["ratio"].default``) or takes the value from the caller."""
    from fl_core.config.model import PipelineConfig

    defaults = _config_defaults(PipelineConfig, {})
    assert defaults["ratio"] == {"0.1"} and defaults["accountant"] == {"'prv'"}  # it reads them
    repeated = []
    for package in ("fl_core", "adapters", "flows", "tasks"):
        for path in sorted((ROOT / package).rglob("*.py")):
            where = path.relative_to(ROOT).as_posix()
            if where in DEFAULTS_HOME:
                continue
            for name, value in _literal_defaults(ast.parse(path.read_text())):
                if isinstance(value, ast.Constant) and repr(value.value) in defaults.get(name, ()):
                    repeated.append(f"{where}:{value.lineno} {name}={value.value!r}")
    assert not repeated, "config defaults written outside the config model:\n" + \
        "\n".join(repeated)
