"""The fused merge's arguments are defined once (kernels/merge_params.py): the compiled op's schema takes exactly
the arguments MergeParams.op_arguments names, and an option that is not a field is refused by name."""

import pytest
import torch

import evolver_kernels as ek
from evolver_kernels.kernels import backends
from evolver_kernels.kernels.merge_params import MergeParams


@pytest.mark.skipif(backends.cpu_extension() is None, reason="the compiled extension is not available")
def test_op_schema_is_the_params_arguments():
    schema = torch.ops.evolver_kernels.merge_.default._schema
    x = torch.zeros(3)
    assert [a.name for a in schema.arguments] == list(MergeParams([x]).op_arguments(x))


def test_an_unknown_option_is_refused_by_name():
    with pytest.raises(TypeError, match="trimm"):
        ek.merge_tensors([torch.zeros(3)], trimm=[0.1])


def test_derived_arguments():
    x = torch.zeros(5)
    p = MergeParams([x, x], base=x, drop_p=0.25, trim=[0.1, 0.2])
    assert p.band and p.elect and p.rescale == 1 / 0.75 and p.drop_threshold == int(0.25 * 2**32)
    assert p.election_weights == [1.0, 1.0] and MergeParams([x, x]).election_weights is None
