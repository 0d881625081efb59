import torch
from torch import nn

from dcube.classify.bn import recalibrate_bn


def test_recalibrated_statistics_are_the_data_statistics_and_momenta_survive():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=0.01))
    x = torch.randn(256, 3) * 5 + 2
    net.train()
    net(x[:16])  # one stale update: running stats far from the data's
    assert recalibrate_bn(net, [(x[s:s + 64],) for s in range(0, 256, 64)]) == 1
    bn = net[1]
    h = net[0](x)
    assert torch.allclose(bn.running_mean, h.mean(0), atol=1e-4)
    assert torch.allclose(bn.running_var, h.var(0), rtol=0.05)
    assert bn.momentum == 0.01 and not net.training
    assert recalibrate_bn(nn.Linear(2, 2), []) == 0
