"""Audio-visual mixup / CutMix: values against hand-computed blends, box/λ bookkeeping, soft targets,
audio handling, determinism under the global seed, argument errors."""

import math

import pytest
import torch

from avfmae.mixup import AudioVisualMixup, sample_band, sample_box, soft_targets

B, T, H, W, TA, FB = 4, 2, 12, 10, 32, 8


def batch(seed=0, b=B):
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(b, 3, T, H, W, generator=g)
    audio = torch.randn(b, 1, TA, FB, generator=g)
    labels = torch.arange(b) % 3
    return video, audio, labels


def smoothed_one_hot(labels, classes, eps):
    out = torch.full((len(labels), classes), eps / classes)
    for i, c in enumerate(labels.tolist()):
        out[i, c] = 1 - eps + eps / classes
    return out


# the reference fine-tuning recipe (the trainer passes TrainConfig's values, which default to off)
REFERENCE = dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.1, mix_audio=False)


def mixer_of(num_classes=3, **changes):
    return AudioVisualMixup(num_classes, **{**REFERENCE, **changes})


def run(mixer, *inputs, seed=0):
    torch.manual_seed(seed)
    return mixer(*inputs)


def test_mixup_blends_each_clip_with_the_flipped_batch():
    video, audio, labels = batch()
    originals = video.clone(), audio.clone()
    out = run(mixer_of(cutmix_alpha=0.0, mix_audio=True), video, audio, labels)
    lam = out.lam
    assert out.mode == "mixup" and 0 < lam < 1 and out.box is None and out.audio_band is None
    for i in range(B):
        j = B - 1 - i
        torch.testing.assert_close(out.video[i], lam * video[i] + (1 - lam) * video[j])
        torch.testing.assert_close(out.audio[i], lam * audio[i] + (1 - lam) * audio[j])
    expected = lam * smoothed_one_hot(labels, 3, 0.1) + (1 - lam) * smoothed_one_hot(labels.flip(0), 3, 0.1)
    torch.testing.assert_close(out.target, expected)
    torch.testing.assert_close(out.target.sum(-1), torch.ones(B))
    assert torch.equal(video, originals[0]) and torch.equal(audio, originals[1])  # inputs untouched


def test_cutmix_pastes_one_box_on_every_frame_and_lambda_is_its_area():
    video, audio, labels = batch(1)
    mixer = mixer_of(mixup_alpha=0.0, label_smoothing=0.0, mix_audio=True)
    for seed in range(6):
        out = run(mixer, video, audio, labels, seed=seed)
        assert out.mode == "cutmix"
        y0, y1, x0, x1 = out.box
        inside = torch.zeros(H, W, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        assert out.lam == pytest.approx(1 - inside.sum().item() / (H * W))
        # every frame and channel: the box comes from the flipped clip, the rest is the clip itself
        expected = torch.where(inside, video.flip(0), video)
        assert torch.equal(out.video, expected)
        changed = (out.video != video).any(dim=(0, 1, 2))     # [H, W]: pixels changed in any frame
        assert torch.equal(changed, inside)
        t0, t1 = out.audio_band
        assert t1 - t0 == round((1 - out.lam) * TA)
        rows = torch.zeros(TA, 1, dtype=torch.bool)
        rows[t0:t1] = True
        assert torch.equal(out.audio, torch.where(rows, audio.flip(0), audio))
        hard = torch.nn.functional.one_hot(labels, 3).float()
        torch.testing.assert_close(out.target, out.lam * hard + (1 - out.lam) * hard.flip(0))


def test_sample_box_clips_at_the_border_and_corrects_lambda():
    for seed in range(40):
        torch.manual_seed(seed)
        lam = float(torch.rand(()))
        (y0, y1, x0, x1), corrected = sample_box(H, W, lam)
        assert 0 <= y0 <= y1 <= H and 0 <= x0 <= x1 <= W
        assert y1 - y0 <= int(H * math.sqrt(1 - lam)) and x1 - x0 <= int(W * math.sqrt(1 - lam))
        assert corrected == pytest.approx(1 - (y1 - y0) * (x1 - x0) / (H * W))
        assert corrected >= lam - 1e-12     # clipping only ever shrinks the box
    assert sample_box(H, W, 1.0)[1] == 1.0          # λ = 1: an empty box, nothing pasted


def test_sample_band_lies_inside_and_has_the_rounded_size():
    torch.manual_seed(0)
    for fraction in (0.0, 0.1, 0.5, 0.99, 1.0):
        t0, t1 = sample_band(TA, fraction)
        assert 0 <= t0 <= t1 <= TA and t1 - t0 == round(fraction * TA)


def test_switch_prob_picks_the_mode_per_batch():
    video, audio, labels = batch()
    always_cut = mixer_of(switch_prob=1.0)
    never_cut = mixer_of(switch_prob=0.0)
    half = mixer_of(switch_prob=0.5)
    assert {run(always_cut, video, audio, labels, seed=s).mode for s in range(5)} == {"cutmix"}
    assert {run(never_cut, video, audio, labels, seed=s).mode for s in range(5)} == {"mixup"}
    modes = [run(half, video, audio, labels, seed=s).mode for s in range(60)]
    assert 15 <= modes.count("cutmix") <= 45


def test_video_only_and_reference_mode_leave_audio_alone():
    video, audio, labels = batch()
    out = run(mixer_of(mix_audio=True), video, None, labels)
    assert out.audio is None and out.video.shape == video.shape
    for seed in range(4):  # both modes
        ref = run(mixer_of(mix_audio=False), video, audio, labels, seed=seed)
        assert torch.equal(ref.audio, audio) and ref.audio_band is None
        mixed = run(mixer_of(mix_audio=True), video, audio, labels, seed=seed)
        assert torch.equal(mixed.video, ref.video) and not torch.equal(mixed.audio, audio)


def test_the_global_seed_makes_it_reproducible():
    video, audio, labels = batch()
    mixer = mixer_of(mix_audio=True)
    first, again = run(mixer, video, audio, labels, seed=7), run(mixer, video, audio, labels, seed=7)
    assert first.lam == again.lam and first.mode == again.mode and first.box == again.box
    assert torch.equal(first.video, again.video) and torch.equal(first.audio, again.audio)
    lams = {run(mixer, video, audio, labels, seed=s).lam for s in range(8)}
    assert len(lams) == 8


def test_soft_targets_match_timm_formula_and_sum_to_one():
    labels = torch.tensor([0, 2, 1, 1])
    target = soft_targets(labels, 4, 0.3, 0.2)
    off, on = 0.05, 0.85
    assert target[0].tolist() == pytest.approx([0.3 * on + 0.7 * off, 0.7 * on + 0.3 * off, off, off])
    torch.testing.assert_close(target.sum(-1), torch.ones(4))


def test_soft_targets_feed_the_classifier_loss_without_double_smoothing():
    import avfmae

    torch.manual_seed(0)
    model = avfmae.build_model("tiny", "finetune", num_outputs=3, label_smoothing=0.1)
    logits = torch.randn(4, 3)
    labels = torch.tensor([0, 1, 2, 0])
    soft = soft_targets(labels, 3, 1.0, 0.1)        # λ = 1: smoothing only
    expected = -(soft * logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(model.compute_loss(logits, soft), expected)
    # the same smoothing given as hard labels: identical loss
    torch.testing.assert_close(model.compute_loss(logits, labels), expected)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_classes": 0}, "num_classes"),
    ({"num_classes": 2.5}, "num_classes"),
    ({"mixup_alpha": -0.1}, "mixup_alpha"),
    ({"cutmix_alpha": float("nan")}, "cutmix_alpha"),
    ({"mixup_alpha": 0.0, "cutmix_alpha": 0.0}, "both 0"),
    ({"switch_prob": 1.5}, "switch_prob"),
    ({"label_smoothing": 1.0}, "label_smoothing"),
])
def test_bad_arguments_name_the_argument(kwargs, message):
    args = {"num_classes": 3, **REFERENCE, **kwargs}
    with pytest.raises(ValueError, match=message):
        AudioVisualMixup(**args)


def test_bad_batches_are_rejected():
    mixer = mixer_of()
    video, audio, labels = batch(b=3)
    with pytest.raises(ValueError, match="even batch"):
        mixer(video, audio, labels)
    video, audio, labels = batch()
    with pytest.raises(ValueError, match="video"):
        mixer(video[0], audio, labels)
    with pytest.raises(ValueError, match="audio"):
        mixer(video, audio[:2], labels)
    with pytest.raises(ValueError, match="labels must be integer"):
        mixer(video, audio, labels.float())
    with pytest.raises(ValueError, match="labels must lie in"):
        mixer(video, audio, torch.tensor([0, 1, 2, 3]), validate=True)


class HostReadForbidden(torch.Tensor):
    """Labels whose values may not be read on the host (on a GPU, each read waits for the device)."""

    def __bool__(self):
        raise AssertionError("labels read on the host")

    def tolist(self):
        raise AssertionError("labels read on the host")

    def item(self):
        raise AssertionError("labels read on the host")


def test_a_training_step_reads_no_label_on_the_host():
    """The per-step call leaves the values alone (read_manifest checked them); validate=True reads them."""
    video, audio, labels = batch()
    watched = labels.clone().as_subclass(HostReadForbidden)
    out = run(mixer_of(mix_audio=True), video, audio, watched)
    reference = run(mixer_of(mix_audio=True), video, audio, labels)
    assert torch.equal(out.target.as_subclass(torch.Tensor), reference.target) and out.lam == reference.lam
    with pytest.raises(AssertionError, match="read on the host"):
        mixer_of()(video, audio, watched, validate=True)


def test_the_mixer_has_no_defaults_of_its_own():
    """TrainConfig owns them: the mixer's own mix_audio=True contradicted mixup_audio's False."""
    with pytest.raises(TypeError, match="mix_audio"):
        AudioVisualMixup(3, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.1)
