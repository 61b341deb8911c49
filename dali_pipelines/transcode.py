"""Re-encode a dataset so DALI's CPU decoders can read it: VP9 video (WebM) and 16 kHz mono wav.

``python -m dali_pipelines.transcode SRC_MANIFEST DST_DIR [--crf 32] [--workers N]``

Reads any manifest :func:`read_manifest` accepts, writes each clip's video as ``DST_DIR/<path>.webm``
and its audio as ``DST_DIR/<path>.wav`` (``<path>`` = the source video's path relative to the source
manifest's folder without its suffix, or ``clip_<row>`` for files outside it), then
``DST_DIR/manifest.csv`` with the same rows and labels. The audio column may name a video container
(e.g. the clip's own .mp4): its first audio stream is decoded and resampled to 16 kHz mono.
Videos that are already VP8/VP9/MJPEG (with ``--keep-nvdec-video`` also H.264/HEVC/MPEG-4/AV1, for
``device="gpu"``) and wavs already at 16 kHz mono are copied with their own suffix, not re-encoded.
Every failure is collected and reported at the end; no manifest is written unless all clips succeed.
"""

from __future__ import annotations

import argparse
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import av
import numpy as np
import soundfile as sf
from tqdm import tqdm

from .manifest import Manifest, ManifestError, read_manifest, write_manifest
from .source import CPU_VIDEO_CODECS, GPU_VIDEO_CODECS, probe_video
from .spec import ClipSpec

SAMPLE_RATE = ClipSpec().sample_rate  # the rate the loaders decode to: ClipSpec owns it


def _output_stem(src: Path, base: Path, row: int) -> Path:
    return src.relative_to(base).with_suffix("") if src.is_relative_to(base) else Path(f"clip_{row:06d}")


def transcode_video(src: Path, dst: Path, crf: int = 32) -> None:
    """Re-encode ``src``'s first video stream to VP9 in WebM (same frame rate and size, yuv420p)."""
    with av.open(str(src)) as inp, av.open(str(dst), "w", format="webm") as out:
        in_stream = inp.streams.video[0]
        in_stream.thread_type = "AUTO"
        rate = in_stream.average_rate or 25
        stream = out.add_stream("libvpx-vp9", rate=rate)
        stream.width, stream.height = in_stream.codec_context.width, in_stream.codec_context.height
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "b:v": "0", "deadline": "good", "cpu-used": "5", "row-mt": "1"}
        for frame in inp.decode(in_stream):
            frame.pts = None  # let the encoder number frames at the output rate
            out.mux(stream.encode(frame.reformat(format="yuv420p")))
        out.mux(stream.encode())


def transcode_audio(src: Path, dst: Path, sample_rate: int = SAMPLE_RATE) -> None:
    """Decode ``src``'s first audio stream (wav or any container), resample to mono, write 16-bit wav."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=sample_rate)
    chunks = []
    with av.open(str(src)) as inp:
        if not inp.streams.audio:
            raise ValueError(f"{src} has no audio stream")
        for frame in inp.decode(inp.streams.audio[0]):
            chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
    chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    wave = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
    sf.write(dst, wave, sample_rate, subtype="PCM_16")


def _is_ready_wav(path: Path) -> bool:
    try:
        info = sf.info(path)
    except (sf.LibsndfileError, RuntimeError):
        return False
    return info.format == "WAV" and info.samplerate == SAMPLE_RATE and info.channels == 1


def convert_clip(video: Path, audio: Path, stem_out: Path, crf: int = 32, keep=CPU_VIDEO_CODECS) -> Path:
    """Write one clip as ``stem_out`` + ``.webm`` (VP9) and ``.wav``; returns the video path written.

    Videos whose codec is in ``keep`` are copied with their own suffix instead of re-encoded; so are
    wavs already at 16 kHz mono.
    """
    stem_out.parent.mkdir(parents=True, exist_ok=True)
    if probe_video(video.read_bytes(), video).codec in keep:
        video_out = stem_out.with_name(stem_out.name + video.suffix)
        shutil.copyfile(video, video_out)
    else:
        video_out = stem_out.with_name(stem_out.name + ".webm")
        transcode_video(video, video_out, crf)
    audio_out = stem_out.with_name(stem_out.name + ".wav")
    if _is_ready_wav(audio):
        shutil.copyfile(audio, audio_out)
    else:
        transcode_audio(audio, audio_out)
    return video_out


def _convert_row(job: tuple[Path, Path, Path, int, frozenset[str]]) -> tuple[Path | None, str | None]:
    try:
        return convert_clip(*job), None
    except Exception as e:  # noqa: BLE001 - every failure is reported with its file at the end
        return None, f"{job[0]}: {type(e).__name__}: {e}"


def transcode_manifest(
    src_manifest: str | Path,
    dst_dir: str | Path,
    crf: int = 32,
    workers: int | None = None,
    progress: bool = True,
    keep_nvdec_video: bool = False,
) -> Path:
    """Transcode every clip of ``src_manifest`` into ``dst_dir`` and write ``dst_dir/manifest.csv``.

    ``keep_nvdec_video``: copy videos NVDEC decodes (H.264, HEVC, ...) and only extract the audio,
    for datasets loaded with ``device="gpu"``.

    Raises:
        ManifestError: the source manifest is invalid, two clips map to the same output file, or
            some clips failed (all failures listed, the first 10 shown).
    """
    manifest: Manifest = read_manifest(src_manifest)
    dst = Path(dst_dir).resolve()
    base = manifest.path.parent
    keep = GPU_VIDEO_CODECS if keep_nvdec_video else CPU_VIDEO_CODECS
    jobs, seen = [], {}
    for row, clip in enumerate(manifest.clips):
        stem_out = dst / _output_stem(clip.video, base, row)
        if stem_out in seen:
            raise ManifestError(f"{clip.video} and {seen[stem_out]} would both be written to {stem_out}.*")
        seen[stem_out] = clip.video
        jobs.append((clip.video, clip.audio, stem_out, crf, keep))
    workers = workers or os.cpu_count() or 1
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = list(tqdm(pool.map(_convert_row, jobs), total=len(jobs), desc="transcoding", unit="clip",
                            disable=not progress))
    failures = [error for _, error in results if error]
    if failures:
        shown = "\n  ".join(failures[:10])
        raise ManifestError(f"{len(failures)} of {len(jobs)} clips failed to transcode; no manifest written:"
                            f"\n  {shown}")
    rows = []
    for (video_out, _), job, clip in zip(results, jobs, manifest.clips, strict=True):
        label = clip.label[0] if manifest.task == "classification" else (clip.label or None)
        rows.append((video_out, job[2].with_name(job[2].name + ".wav"), label))
    return write_manifest(dst / "manifest.csv", rows, manifest.label_columns or ("label",))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dali_pipelines.transcode",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("src_manifest", type=Path, help="manifest to convert (CSV or HiCMAE-style)")
    parser.add_argument("dst_dir", type=Path, help="output folder; receives the clips and manifest.csv")
    parser.add_argument("--crf", type=int, default=32, help="VP9 constant quality (lower = better, larger)")
    parser.add_argument("--workers", type=int, default=None, help="parallel processes (default: all CPUs)")
    parser.add_argument("--keep-nvdec-video", action="store_true",
                        help="copy H.264/HEVC/MPEG-4/AV1 videos (for device='gpu'); only extract 16 kHz wavs")
    args = parser.parse_args(argv)
    out = transcode_manifest(args.src_manifest, args.dst_dir, args.crf, args.workers,
                             keep_nvdec_video=args.keep_nvdec_video)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
