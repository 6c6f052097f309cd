import torch

from ead_dist.models import build_model
from ead_dist.trajectory import sgd_trajectory


def _data(n=96):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def _model():
    torch.manual_seed(1)
    return build_model("convnet", 1, 3, (8, 8), width=4, depth=1)


def test_checkpoints_every_save_every_steps_and_at_the_end():
    x, y = _data()
    steps = [c.step for c in sgd_trajectory(_model(), x, y, epochs=2, lr=0.1, batch_size=16,
                                            save_every=4, seed=3)]
    assert steps == [0, 4, 8, 12]  # 6 steps per epoch, 12 in all


def test_resume_from_a_checkpoint_is_exact():
    x, y = _data()
    kwargs = dict(epochs=2, lr=0.1, batch_size=16, save_every=5, seed=3, augmentation="crop_flip")
    full = list(sgd_trajectory(_model(), x, y, **kwargs))
    resumed = list(sgd_trajectory(_model(), x, y, start=full[1], **kwargs))  # from step 5
    assert [c.step for c in resumed] == [c.step for c in full[2:]]
    for a, b in zip(full[2:], resumed):
        for name in a.params:
            assert torch.equal(a.params[name], b.params[name]), name
