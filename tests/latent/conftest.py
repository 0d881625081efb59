import pytest
import torch


def blobs(n: int, size: int = 16, seed: int = 0, channels: int = 1):
    """Easy two-class images in [-1, 1]: a bright blob on the left (class 0) or right (class 1)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    cx = torch.where(y == 0, size * 0.25, size * 0.75)[:, None, None]
    blob = torch.exp(-((xx - cx) ** 2 + (yy - size / 2) ** 2) / (size / 4) ** 2)
    x = -0.6 + 1.4 * blob + 0.1 * torch.randn(n, size, size, generator=g)
    return x[:, None].expand(n, channels, size, size).clamp(-1, 1).contiguous(), y


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread. On a shared, oversubscribed CPU, two OpenMP threads
    waiting on each other made these tests 5-20x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def micro_unet():
    from dcube.config import DiffusionConfig
    from dcube.diffusion import build_denoiser
    from dcube.diffusion.schedule import ddpm_scheduler

    torch.manual_seed(0)
    cfg = DiffusionConfig(backbone="unet", preset="micro")
    model = build_denoiser(cfg, 1, 16, 2).eval()
    with torch.no_grad():  # MONAI zero-initialises the output conv: randomise so classes differ
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, ddpm_scheduler(cfg)
