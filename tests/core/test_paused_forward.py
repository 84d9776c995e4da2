"""A forward pass that stops in front of chosen modules, is resumed, and is never left hanging."""
import pytest
import torch
from torch import nn

from compquant.core.paused_forward import PausedForward


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x, *, scale=1.0):
        return self.c(self.b(self.a(x)) + self.a(x)) * scale


def test_stops_once_per_key_with_the_inputs_as_they_are_then_and_returns_the_output(live_forwards):
    torch.manual_seed(0)
    chain, x = Chain(), torch.randn(2, 4)
    expected = chain(x, scale=2.0)
    with PausedForward(chain, (x,), {"scale": 2.0}, {chain.a: "first", chain.b: "first", chain.c: "last"}) as forward:
        stop = forward.advance()
        assert (stop.key, stop.module) == ("first", chain.a) and torch.equal(stop.args[0], x)
        stop = forward.advance()  # b and the second call of a share a's key: no stop until c
        assert (stop.key, stop.module) == ("last", chain.c)
        with torch.no_grad():
            chain.c.weight.zero_()  # what runs after a stop sees the module as it is on resuming
        assert forward.advance() is None and forward.finished
        torch.testing.assert_close(forward.output, chain.c.bias.expand(2, 4) * 2.0)
    assert not torch.equal(forward.output, expected) and not live_forwards()


def test_another_caller_of_the_same_modules_runs_straight_through():
    chain = Chain()
    with PausedForward(chain, (torch.randn(2, 4),), {}, {chain.b: 0}) as forward:
        assert forward.advance().key == 0
        chain(torch.randn(2, 4))  # not stopped: only the paused forward's own calls stop
        assert forward.advance() is None


def test_runs_in_the_callers_grad_and_inference_modes():
    chain = Chain()
    seen = []
    chain.a.register_forward_pre_hook(lambda module, args: seen.append((torch.is_grad_enabled(),
                                                                          torch.is_inference_mode_enabled())))
    with torch.inference_mode():
        with PausedForward(chain, (torch.randn(2, 4),), {}, {}) as forward:
            assert forward.advance() is None
    assert seen == [(False, True)] * 2 and forward.output.is_inference()


def test_an_error_inside_the_forward_reaches_the_caller_with_its_message(live_forwards):
    chain = Chain()

    def fail(module, args):
        raise ValueError("broken inside b")

    chain.b.register_forward_pre_hook(fail)
    with PausedForward(chain, (torch.randn(2, 4),), {}, {chain.a: 0, chain.c: 1}) as forward:
        assert forward.advance().key == 0
        with pytest.raises(ValueError, match="broken inside b"):
            forward.advance()
        with pytest.raises(RuntimeError, match="cannot be advanced"):
            forward.advance()
    assert not live_forwards()


def test_closing_unwinds_a_stopped_or_unstarted_forward_through_its_finally_blocks(live_forwards):
    unwound = []

    class Guarded(Chain):
        def forward(self, x, **kwargs):
            try:
                return super().forward(x, **kwargs)
            except Exception:  # the model's own handlers do not swallow the unwinding
                unwound.append("swallowed")
                raise
            finally:
                unwound.append("finally")

    chain = Guarded()
    stopped = PausedForward(chain, (torch.randn(2, 4),), {}, {chain.b: 0})
    unstarted = PausedForward(chain, (torch.randn(2, 4),), {}, {chain.b: 0})
    assert stopped.advance().key == 0 and len(live_forwards()) == 1  # held at b until closed
    stopped.close()
    unstarted.close()
    assert unwound == ["finally"] and not live_forwards()
    assert not chain.b._forward_pre_hooks  # the stops' hooks are gone with the forwards


def test_a_stop_carries_what_its_own_forward_set_in_context_variables():
    """Each forward has its own context: what the model's code set in one is seen at that forward's
    stops only, however the forwards interleave (the routing masks of core/routing.py rely on it)."""
    import contextvars

    tag = contextvars.ContextVar("tag", default=None)

    class Tagging(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x, *, name):
            tag.set(name)
            return self.a(x)

    block = Tagging()
    forwards = [PausedForward(block, (torch.randn(2, 4),), {"name": name}, {block.a: 0}) for name in ("one", "two")]
    stops = [forward.advance() for forward in forwards]
    assert [stop.context.get(tag) for stop in stops] == ["one", "two"] and tag.get() is None
    for forward in forwards:
        assert forward.advance() is None
