"""cocotb bench: a whole network on the conv engine sim top, from a deploy folder.

Written by :func:`dynacc.sim.network.run_network`; the JSON manifest ``$DYNACC_NET_MANIFEST``
names the deploy folder, the input images (``.npy``) and where results go. The bench walks
the deploy's layer program with :func:`dynacc.sw.runtime.chain`: host steps run in this
process with the golden rules, every engine layer runs on the RTL with its weight memories
loaded by ``$readmemh`` straight from the deploy folder's ``.mem`` files (once per layer) and
its activations (and fused-residual operand) written from the previous RTL outputs (per
image). Outputs are read back from the dumped ``out`` memory and feed the next steps.

A deploy folder with dual-precision layers (``engine: dual``) runs on the two-engine top
(:mod:`dynacc.sim.net_top`): before each layer the bench sets ``sel`` to the layer's engine,
a dual layer also loads its ``gate`` memory, runs in its exported mode or in the mode the
manifest's ``modes`` gives for that image (DFS: the host gate's decision; the descriptor is
repacked with that mode), and dumps its gate outcomes (``passed.mem``) with its outputs.

A DFS deploy run with ``"dfs"`` in the manifest walks the chain with a
:class:`~dynacc.sw.dfs_host.DfsHost`: the host gate decides each gated block from the RTL's
own block outputs (or the forced ``decisions``), gated layers run in mode ``msb`` with the
chosen ``msb_bits`` (descriptor ``lsb_bits`` repacked) or ``full``, skipped blocks' convs do
not run and their output is the host's skip rule. Also written: ``<out>/dfs.npz``
(``decisions``, ``gate_decisions``, ``probs``).

Results: ``<out>/acts.npz`` (every tensor of the run, ``[N, ...]`` int16),
``<out>/passed.npz`` (dual layers: gate outcomes ``[N, O, Ho, Wo]`` uint8),
``<out>/result.json`` (per layer: RTL ``cycles`` per image and RTL wall seconds), and one line
per engine run appended to ``<progress>``.

Manifest: ``{"deploy": dir, "images": npy, "integer_input": bool, "out": dir,
"progress": file, "load_bits": {mem: bit} | {engine: {mem: bit}}, "engines": bool (two-engine
top), "modes": null | [{layer: mode}, ...] (one per image), "clock": "gpi" | "py",
"verify": bool, "dfs": null | {"decisions": null | [[option index or -1, ...], ...]}}``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import cocotb
import numpy as np
import torch

from dynacc.hw.dual_engine import passed_word_layout
from dynacc.hw.dual_program import MODE_CODES
from dynacc.hw.dual_sequencer import dual_desc_layout
from dynacc.hw.types import act_word_layout
from dynacc.sim.benches.dual_bench import DualTB
from dynacc.sim.net_top import ENGINE_SEL
from dynacc.sim.memfile import read_mem, write_mem
from dynacc.sw import fileformat as ff
from dynacc.sw.reader import load_deploy
from dynacc.sw.runtime import act_image, chain, job_descriptor, unpack_output


@cocotb.test()
async def network(dut: Any) -> None:
    """Run every image of the manifest through every step of the deploy folder."""
    man = json.loads(Path(os.environ["DYNACC_NET_MANIFEST"]).read_text())
    dep = load_deploy(man["deploy"], images=False, verify=man.get("verify", True))
    hw = dep.hw
    lanes = hw.lanes
    lay = act_word_layout(hw)
    lay_passed = passed_word_layout(hw)
    load_bits = man["load_bits"]
    images = torch.from_numpy(np.load(man["images"]))
    out = Path(man["out"])
    io = out / "io"
    io.mkdir(parents=True, exist_ok=True)
    tb = DualTB(dut, man.get("clock", "gpi"))
    two = bool(man.get("engines", False))
    if two:
        dut.sel.value = 0
    await tb.reset()
    modes = man.get("modes")
    dlay = dual_desc_layout(hw)
    cycles: dict[str, list[int]] = {l.name: [] for l in dep.layers}
    images_of: dict[str, list[int]] = {l.name: [] for l in dep.layers}   # image of each run
    wall: dict[str, float] = {l.name: 0.0 for l in dep.layers}
    passed: dict[str, list[np.ndarray]] = {l.name: [] for l in dep.layers if l.engine == "dual"}
    dfs = None
    if man.get("dfs") is not None:
        from dynacc.sw.dfs_host import DfsHost
        dfs = DfsHost(dep, len(images), man["dfs"].get("decisions"))
    gen = chain(dep, images, integer_input=man.get("integer_input", False), dfs=dfs)
    runs = 0
    with open(man["progress"], "a", buffering=1) as progress:
        try:
            job = next(gen)
            while True:
                layer = job.layer
                dual = layer.engine == "dual"
                bits = load_bits[layer.engine] if two else load_bits
                if two:
                    dut.sel.value = ENGINE_SEL[layer.engine]
                files = {}
                if job.first_of_layer:   # weights, shifts (and gates): the deploy's own files
                    files.update({m: str(p) for m, p in layer.files.items()})
                write_mem(io / "act.mem", act_image(job.x, lanes), lay)
                files["act"] = str(io / "act.mem")
                if job.residual is not None:
                    write_mem(io / "res.mem", act_image(job.residual, lanes), lay)
                    files["res"] = str(io / "res.mem")
                await tb.load(files, bits)
                desc = layer.descriptor_bits
                mode = (modes[job.image] or {}).get(layer.name) if modes else None
                if dual and job.mode is not None:
                    mode = job.mode
                if dual and mode is not None and MODE_CODES[mode] != layer.descriptor["mode"]:
                    desc = int(dlay.const({**layer.descriptor, "mode": MODE_CODES[mode]}
                                          ).as_bits())
                if dual and (job.mode is not None or job.msb_bits is not None):
                    desc = int(dlay.const(job_descriptor(layer, job.mode, job.msb_bits)
                                          ).as_bits())
                t0 = time.perf_counter()
                c = await tb.run(desc)
                wall[layer.name] += time.perf_counter() - t0
                if dual:
                    await tb.dump_all(layer.out_words, io, ["out", "passed"])
                    p = unpack_output(read_mem(io / "passed.mem", lay_passed), layer, lanes)
                    passed[layer.name].append(p.astype(np.uint8))
                else:
                    await tb.dump(layer.out_words, io / "out.mem")
                y = unpack_output(read_mem(io / "out.mem", lay), layer, lanes)
                cycles[layer.name].append(c)
                images_of[layer.name].append(job.image)
                runs += 1
                progress.write(f"{runs} {layer.name} {job.image}\n")
                job = gen.send(y)
        except StopIteration as stop:
            acts = stop.value
    np.savez(out / "acts.npz", **{k: v.numpy().astype(np.int16) for k, v in acts.items()})
    np.savez(out / "passed.npz", **{k: np.stack(v) for k, v in passed.items() if v})
    if dfs is not None:
        np.savez(out / "dfs.npz", decisions=dfs.decisions.numpy(),
                 gate_decisions=dfs.gate_decisions.numpy(), probs=dfs.probs.numpy())
    (out / "result.json").write_text(json.dumps({"cycles": cycles, "rtl_wall_s": wall,
                                                 "runs": runs, "images": images_of}))
