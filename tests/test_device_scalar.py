"""DeviceScalar: the value a compiled step reads changes in place, and only where it changes."""

import torch

from recu_cli.training.device_scalar import DeviceScalar
from recu_cli.training.switch import SignPenalty


def test_set_writes_in_place_and_only_a_new_value():
    scalar = DeviceScalar(6.0, torch.device("cpu"))
    buffer, version = scalar.tensor.data_ptr(), scalar.tensor._version
    scalar.set(6.0)  # unchanged: no write (a captured step's buffer is left alone)
    assert scalar.tensor._version == version
    scalar.set(3.0)
    assert (scalar.value, float(scalar.tensor)) == (3.0, 3.0)
    assert scalar.tensor.data_ptr() == buffer and scalar.tensor._version == version + 1
    assert scalar.tensor.dtype == torch.float32 and scalar.tensor.dim() == 0


def test_sign_penalty_term_is_skipped_at_zero_and_scaled_by_the_share():
    model = torch.nn.Sequential()  # no binary layers: only the skip is read at 0
    penalty = SignPenalty(40.0, torch.device("cpu"))
    assert penalty.term(model) is None
    penalty.set_share(0.25)
    assert (penalty.scale.value, float(penalty.scale.tensor)) == (10.0, 10.0)
    penalty.set_share(0.0)
    assert penalty.term(model) is None
