import pytest
import torch
from torch import nn

from compquant.core.online import InputOp, attach_input_op, describe_input_ops, input_ops, restore_input_ops


class Negate(InputOp):
    def init_kwargs(self):
        return {}

    def forward(self, x):
        return -x


def test_input_ops_run_before_the_linear_and_round_trip_through_a_description():
    model = nn.Sequential(nn.Linear(4, 4))
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    plain = model(x)
    attach_input_op(model[0], Negate())
    torch.testing.assert_close(model(x), model[0].bias * 2 - plain)
    description = describe_input_ops(model)
    assert description == {"0": [{"class": f"{__name__}:Negate", "kwargs": {}}]}
    fresh = nn.Sequential(nn.Linear(4, 4))
    restore_input_ops(fresh, description)
    assert [type(op) for op in input_ops(fresh[0])] == [Negate]


def test_restoring_refuses_anything_but_input_ops():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="not a compquant InputOp"):
        restore_input_ops(model, {"0": [{"class": "os:system", "kwargs": {"command": "true"}}]})
    with pytest.raises(TypeError, match="must subclass"):
        attach_input_op(model[0], nn.ReLU())
