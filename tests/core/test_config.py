import pytest
from pydantic import ValidationError

from compquant import QuantConfig


def test_config_round_trips_through_json(tmp_path):
    config = QuantConfig(solver="gptq", solver_options={"act_order": True}, grid={"bits": 3, "group_size": 64},
                         calibration={"nsamples": 16, "seqlen": 256}, transforms=[], data_dir=tmp_path)
    path = tmp_path / "config.json"
    config.save(path)
    assert QuantConfig.load(path) == config


def test_config_loads_from_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("solver: rtn\ngrid:\n  bits: 2\n  group_size: -1\n  sym: true\n")
    config = QuantConfig.load(path)
    assert config.solver == "rtn" and config.grid.bits == 2 and config.grid.sym


@pytest.mark.parametrize(
    "data, field",
    [
        ({"solvr": "gptq"}, "solvr"),
        ({"grid": {"bits": 1}}, "grid.bits"),
        ({"grid": {"bits": 9}}, "grid.bits"),
        ({"grid": {"group_size": 0}}, "grid.group_size"),
        ({"grid": {"group_size": -5}}, "grid.group_size"),
        ({"calibration": {"nsamples": 0}}, "calibration.nsamples"),
        ({"stats_dtype": "float16"}, "stats_dtype"),
    ],
)
def test_invalid_values_name_the_field(data, field):
    with pytest.raises(ValidationError, match=field.replace(".", r"\.")):
        QuantConfig.model_validate(data)


def test_config_file_must_be_json_or_yaml(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("solver = 'gptq'")
    with pytest.raises(ValueError, match=r"\.json, \.yaml or \.yml"):
        QuantConfig.load(path)
