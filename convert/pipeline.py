"""``moestream convert``: run a :class:`ConversionPlan` into a pack, atomically and resumably.

Order of work: check the output folder, write each MoE layer's expert file (experts quantized in
parallel threads: the numba kernels release the GIL), then the resident files, copy tokenizer and
config files, write the error report, and write ``manifest.json`` last. Each finished file gets a
sidecar record in ``<out>/.moestream-work/`` so ``--resume`` can skip it after re-checking its
checksums; the work folder is removed once the manifest exists. Until then nothing in the output
looks like a valid pack.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path

import xxhash
from tqdm import tqdm

from moestream import __version__
from moestream.layouts import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    ExpertLayer,
    ExpertLayerWriter,
    Manifest,
    ResidentFile,
    ResidentTensor,
    file_checksum,
)
from moestream.layouts.pack import verify_expert_file
from moestream.quant import ErrorStats
from moestream.quant.calibration import Calibration
from moestream.quant.report import report_row, write_report

from .family import family_for
from .plan import ConversionPlan, ExpertLayerPlan, Options, build_plan, tensor_kind
from .source import EXTRA_FILES, ConvertError, SourceCheckpoint, resolve_source
from .writers import expert_block, write_resident_file

log = logging.getLogger(__name__)
WORK = ".moestream-work"


def plan_conversion(
    source: str, revision: str | None = None, **options
) -> tuple[ConversionPlan, SourceCheckpoint, dict]:
    """Resolve the source and build the plan (headers only; nothing is written)."""
    Options(**options).resolved_method()  # option conflicts fail before anything is read or written
    if options.get("calibration"):
        Calibration.load(options["calibration"], header_only=True)
    folder, provenance = resolve_source(source, revision)
    src = SourceCheckpoint.open(folder)
    try:
        plan = build_plan(src, family_for(src.config, str(folder / "config.json")), Options(**options))
    except BaseException:
        src.close()
        raise
    return plan, src, provenance


def convert(
    source: str,
    output: str | os.PathLike,
    *,
    revision: str | None = None,
    jobs: int | None = None,
    resume: bool = False,
    force: bool = False,
    dry_run: bool = False,
    progress: bool = False,
    **options,
) -> Manifest | ConversionPlan:
    """Convert a Hugging Face checkpoint (folder or hub id) into a pack at ``output``.

    Args:
        source: checkpoint folder, or hub id ``owner/name``.
        output: pack folder to create.
        revision: hub revision (branch, tag or commit).
        jobs: worker threads (default: all cores).
        resume: continue an interrupted conversion, keeping the files it finished.
        force: replace an existing pack (never a folder that is not a pack).
        dry_run: return the plan without writing anything.
        progress: show a progress bar (in source bytes).
        **options: :class:`~moestream.convert.plan.Options` fields (bits, group_size, method, ...).

    Returns:
        the written pack's manifest, or the plan when ``dry_run``.
    """
    plan, src, provenance = plan_conversion(source, revision, **options)
    try:
        if dry_run:
            return plan
        out = Path(output)
        if out.resolve() == src.folder.resolve():
            raise ConvertError(f"{out}: output folder is the source folder")
        _prepare_output(out, resume, force)
        return _run(plan, src, provenance, out, jobs or os.cpu_count() or 1, progress)
    finally:
        src.close()


def _prepare_output(out: Path, resume: bool, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConvertError(f"{out}: exists and is not a folder")
    if out.is_dir():
        entries = {p.name for p in out.iterdir()}
        if MANIFEST_NAME in entries:
            if not force:
                raise ConvertError(f"{out}: already a pack (pass --force to replace it)")
            (out / MANIFEST_NAME).unlink()  # from here on the old pack is no longer valid
            shutil.rmtree(out / WORK, ignore_errors=True)
        elif WORK in entries:
            if force:
                shutil.rmtree(out / WORK)
            elif not resume:
                raise ConvertError(
                    f"{out}: holds an interrupted conversion (pass --resume to continue it or --force to start over)"
                )
        elif entries:
            raise ConvertError(f"{out}: exists, is not empty and is not a moestream pack; refusing to write into it")
    try:
        (out / WORK).mkdir(parents=True, exist_ok=True)
        probe = out / WORK / "probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConvertError(f"{out}: cannot write there ({e.strerror})") from None


def _fingerprint(plan: ConversionPlan, src: SourceCheckpoint) -> str:
    key = {
        "source": src.fingerprint(),
        "options": asdict(plan.options),
        "float_dtype": plan.float_dtype,
        "format_version": FORMAT_VERSION,
    }
    if plan.options.calibration:  # the statistics themselves, not just their path
        key["calibration"] = file_checksum(Path(plan.options.calibration))
    return xxhash.xxh3_64_hexdigest(json.dumps(key, sort_keys=True).encode())


def _load_sidecar(out: Path, name: str, fp: str) -> dict | None:
    p = out / WORK / f"{name}.json"
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return d if d.get("fingerprint") == fp else None


def _save_sidecar(out: Path, name: str, fp: str, **data) -> None:
    p = out / WORK / f"{name}.json"
    tmp = p.with_name(p.name + ".partial")
    tmp.write_text(json.dumps({"fingerprint": fp, **data}))
    os.replace(tmp, p)


def _run(
    plan: ConversionPlan, src: SourceCheckpoint, provenance: dict, out: Path, jobs: int, progress: bool
) -> Manifest:
    o, fam = plan.options, plan.family
    fp = _fingerprint(plan, src)
    method = o.resolved_method()
    # Calibration weights the quantizers unless the recipe uses it only to choose tiers.
    cal = Calibration.load(o.calibration) if o.calibration and o.weighted else None
    bar = tqdm(total=plan.src_bytes, unit="B", unit_scale=True, desc="convert", disable=not progress)
    rows: list[dict] = []
    layers: list[ExpertLayer] = []
    rfiles: list[ResidentFile] = []
    rtensors: dict[str, ResidentTensor] = {}
    with ThreadPoolExecutor(jobs, thread_name_prefix="convert") as pool:
        for x in plan.experts:
            side = _load_sidecar(out, Path(x.file).stem, fp)
            if side and verify_expert_file(out, ExpertLayer.from_dict(side["entry"]), o.alignment) is None:
                log.info("layer %d: already converted, skipped (--resume)", x.layer)
                entry, stats = ExpertLayer.from_dict(side["entry"]), side["stats"]
                bar.update(x.src_bytes)
            else:
                entry, st = _convert_layer(pool, jobs, src, x, method, plan.float_dtype, o.alignment, out, bar, cal)
                stats = {p: s.to_dict() for p, s in st.items()}
                _save_sidecar(out, Path(x.file).stem, fp, entry=asdict(entry), stats=stats)
            layers.append(entry)
            for proj, s in stats.items():
                g = x.group_down if proj == "down_proj" else x.group_gate_up
                rows.append(
                    report_row(
                        x.layer,
                        f"experts.{proj}" + (f".tier{x.tier}" if x.expert_ids else ""),
                        f"experts.{proj}",
                        x.down_bits if proj == "down_proj" else x.bits,
                        g,
                        "passthrough" if x.passthrough else method,
                        ErrorStats.from_dict(s),
                    )
                )
        rfiles, stats_by_file = _convert_residents(pool, plan, src, out, fp, method, bar, cal)
    bar.close()
    for f in plan.resident_files:
        for t in f.tensors:
            rtensors[t.target] = ResidentTensor(f.file, list(t.shape), t.dtype, t.bits, t.group_size)
            s = stats_by_file[f.file].get(t.target)
            if s is not None:
                rows.append(
                    report_row(
                        _layer_of(t.target),
                        t.target,
                        tensor_kind(t.target),
                        t.bits,
                        t.group_size,
                        method if t.bits < 16 else "none",
                        ErrorStats.from_dict(s),
                    )
                )
    extra = _copy_extra_files(src.folder, out, fam.pack_config())
    if cal is not None:
        method = f"{method}+calibration"  # as recorded in the report and manifest
        for r in rows:
            r["method"] = method if r["method"] in ("clip", "gptq") else r["method"]
    summary = plan.summary()
    write_report(
        out,
        rows,
        {
            "bits": summary["bits"],
            "group_size": summary["group_size"],
            "method": method,
            "model_type": fam.model_type,
            "source": provenance.get("repo_id") or provenance["path"],
        },
    )
    provenance = {**provenance, "files": src.fingerprint()}
    pack_config = fam.pack_config()
    m = Manifest(
        model_type=fam.model_type,
        config=pack_config.get("text_config", pack_config),
        num_experts=fam.num_experts,
        top_k=fam.top_k,
        quantization=_quant_summary(plan, method),
        experts=layers,
        resident_files=rfiles,
        resident_tensors=rtensors,
        alignment=o.alignment,
        source=provenance,
        extra_files=extra + ["report.json", "report.csv"],
        created_by=f"moestream {__version__}",
    )
    m.check_layout()
    m.save(out)
    shutil.rmtree(out / WORK, ignore_errors=True)
    return m


def _convert_layer(pool, jobs, src, x: ExpertLayerPlan, method, dtype, alignment, out: Path, bar, cal=None):
    ids = x.ids()
    writer = ExpertLayerWriter(
        out / x.file, x.layer, len(ids), x.components, x.block_bytes, alignment, x.tier, x.expert_ids
    )
    stats = {p: ErrorStats() for p in ("gate_proj", "up_proj", "down_proj")}
    per_expert = x.src_bytes // len(ids)

    def one(j: int) -> dict[str, ErrorStats]:
        block, st = expert_block(src, x, ids[j], method, dtype, cal)
        writer.write_expert(j, block)
        bar.update(per_expert)
        return st

    pending: set = set()
    try:
        writer.open()
        nxt = 0
        while nxt < len(ids) or pending:
            # Keep a bounded number of experts in flight: memory stays a few experts per worker.
            while nxt < len(ids) and len(pending) < 2 * jobs:
                pending.add(pool.submit(one, nxt))
                nxt += 1
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for fut in done:
                for p, s in fut.result().items():
                    stats[p].merge(s)
        return writer.finish(x.file), stats
    except OSError as e:
        _cancel(pending)
        writer.abort()
        raise ConvertError(f"{out / x.file}: cannot write ({e.strerror or e})") from None
    except BaseException:
        _cancel(pending)
        writer.abort()
        raise


def _cancel(futures) -> None:
    """Cancel what has not started and wait for what has (so nothing writes after an abort)."""
    for fut in futures:
        fut.cancel()
    wait(futures)


def _convert_residents(pool, plan, src, out, fp, method, bar, cal=None):
    rfiles, stats = {}, {}
    todo = []
    for f in plan.resident_files:
        name = "resident-" + Path(f.file).stem
        side = _load_sidecar(out, name, fp)
        p = out / f.file
        if (
            side
            and p.is_file()
            and p.stat().st_size == side["entry"]["size"]
            and file_checksum(p) == side["entry"]["checksum"]
        ):
            rfiles[f.file], stats[f.file] = ResidentFile(**side["entry"]), side["stats"]
            bar.update(sum(t.src_bytes for t in f.tensors))
        else:
            todo.append(f)

    def one(f):
        try:
            st = write_resident_file(src, plan.family, f, out / f.file, method, plan.hf_layout, bar.update, cal)
        except OSError as e:
            raise ConvertError(f"{out / f.file}: cannot write ({e.strerror or e})") from None
        p = out / f.file
        entry = ResidentFile(f.file, p.stat().st_size, file_checksum(p))
        st = {k: v.to_dict() for k, v in st.items()}
        _save_sidecar(out, "resident-" + Path(f.file).stem, fp, entry=asdict(entry), stats=st)
        return f.file, entry, st

    futures = [pool.submit(one, f) for f in todo]
    wait(futures, return_when=FIRST_EXCEPTION)
    for fut in futures:
        if fut.done() and fut.exception():
            for g in futures:
                g.cancel()
            wait(futures)
            raise fut.exception()
    for fut in futures:
        name, entry, st = fut.result()
        rfiles[name], stats[name] = entry, st
    return [rfiles[f.file] for f in plan.resident_files], stats


def _copy_extra_files(folder: Path, out: Path, config: dict) -> list[str]:
    copied = []
    for name in EXTRA_FILES:
        p = folder / name
        if p.is_file():
            tmp = out / (name + ".partial")
            if name == "config.json":  # the source's, with the field names mlx-lm reads filled in
                tmp.write_text(json.dumps(config, indent=2) + "\n")
            else:
                shutil.copyfile(p, tmp)
            os.replace(tmp, out / name)
            copied.append(name)
    return copied


def _quant_summary(plan: ConversionPlan, method: str) -> dict:
    o = plan.options
    rb = o.resident_bits or o.bits
    experts = {
        "bits": o.bits,
        "group_size": None if o.bits >= 16 else o.group_size,
        "mode": "affine",
        "method": method,
        "scale_dtype": plan.float_dtype,
        "down_bits": o.down_bits or o.bits,
        "tiers": plan.summary()["tiers"],
        "bits_per_weight_budget": o.bits_per_weight,
        "layer_widths": {str(k): v for k, v in (o.layer_widths or {}).items()} or None,
    }
    if plan.experts and plan.experts[0].mode == "mxfp4":  # the source's MXFP4 experts, copied
        experts = {"bits": 4, "group_size": 32, "mode": "mxfp4", "method": "passthrough", "scale_dtype": "uint8"}
    if plan.packed_experts:  # the source's compressed-tensors INT4 experts, as MLX's affine 4-bit layout
        x = plan.experts[0]
        experts = {
            "bits": 4,
            "group_size": x.group_gate_up,
            "mode": "affine",
            "method": "passthrough",
            "scale_dtype": plan.float_dtype,
            "down_bits": 4,
            "source_format": "compressed-tensors pack-quantized int4",
        }
        if x.group_down != x.group_gate_up:
            experts["down_group_size"] = x.group_down
    if plan.experts and plan.experts[0].linear_bias:
        experts["linear_bias"] = True
    return {
        "experts": experts,
        "recipe": o.recipe,
        "resident_kinds": o.resident_kinds,
        "resident": {
            "bits": rb,
            "group_size": None if rb >= 16 else o.group_size,
            "mode": "affine",
            "method": method,
            "router_bits": None if rb >= 16 else max(8, rb),
        },
        "dtype": plan.float_dtype,
    }


def _layer_of(target: str) -> int | None:
    parts = target.split(".layers.")
    return int(parts[1].split(".")[0]) if len(parts) == 2 and parts[1].split(".")[0].isdigit() else None


__all__ = ["convert", "plan_conversion"]
