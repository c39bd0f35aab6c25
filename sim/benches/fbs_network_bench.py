"""cocotb bench: a whole FBS network on the dual-precision engine sim top, layer by layer.

Written by :func:`dynacc.sim.fbs_network.run_fbs_network`; the JSON manifest
``$DYNACC_FBSNET_MANIFEST`` names ``inputs`` (a ``torch.save`` of the FBSProgram, the float
images and the HwConfig), ``out`` and the ``load_bits``. The bench walks
:func:`dynacc.sim.fbs_network.fbs_chain`: host steps (input quantizer, predictor, compaction,
expansion, pooling, FC) run in this process; each compacted conv of each image is written as
memory images, loaded, run (mode ``fbs``) and its ``out`` / ``passed`` memories dumped and fed
back, so every conv reads the previous conv's RTL output.

Result: ``<out>/result.pt`` (``torch.save``): ``acts``, ``scale``, ``active``, ``bias``
(numpy), per FBS conv ``cycles``, ``passed`` (outputs flagged passing) and ``compact``
(compacted in / out channels) ``[N]`` / ``[N, 2]``, and ``rtl_wall_s``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import cocotb
import numpy as np
import torch

from dynacc.hw.dual_engine import passed_word_layout
from dynacc.hw.dual_program import DualProgram
from dynacc.hw.dual_sequencer import dual_desc_layout
from dynacc.hw.types import act_word_layout
from dynacc.sim.benches.dual_bench import DualTB
from dynacc.sim.conv import write_layer_cases
from dynacc.sim.dual import _LAYOUTS
from dynacc.sim.fbs_network import fbs_chain
from dynacc.sim.memfile import read_mem


@cocotb.test()
async def fbs_network(dut: Any) -> None:
    """Run every image through every layer of the FBS network."""
    man = json.loads(Path(os.environ["DYNACC_FBSNET_MANIFEST"]).read_text())
    inp = torch.load(man["inputs"], weights_only=False)
    fp, images, hw = inp["fbs_program"], inp["images"], inp["cfg"]
    out = Path(man["out"])
    jobs = out / "jobs"
    dlay = dual_desc_layout(hw)
    layouts = {m: f(hw) for m, f in _LAYOUTS.items()}
    lay, lay_passed = act_word_layout(hw), passed_word_layout(hw)
    n = len(images)
    names = [g.name for g in fp.gates]
    cycles = {g: np.zeros(n, dtype=np.int64) for g in names}
    passed = {g: np.zeros(n, dtype=np.int64) for g in names}
    compact = {g: np.zeros((n, 2), dtype=np.int64) for g in names}
    tb = DualTB(dut, "gpi")
    await tb.reset()
    rtl_wall = 0.0
    gen = fbs_chain(fp, images)
    k = 0
    try:
        job = next(gen)
        while True:
            prog = DualProgram(job.layer, hw)
            jdir = jobs / f"{k:04d}"
            jdir.mkdir(parents=True)
            case = write_layer_cases(jdir, [prog], dlay, layouts)[0]
            await tb.load(case["load"], man["load_bits"])
            t0 = time.perf_counter()
            cycles[job.gate][job.image] = await tb.run(case["desc"])
            rtl_wall += time.perf_counter() - t0
            cdir = Path(case["dir"])
            await tb.dump_all(case["dump_words"], cdir, ["out", "passed"])
            y = prog.unpack_output(read_mem(cdir / "out.mem", lay))
            passed[job.gate][job.image] = int(
                prog.unpack_passed(read_mem(cdir / "passed.mem", lay_passed)).sum())
            compact[job.gate][job.image] = (np.shape(job.layer.x)[0], job.layer.out_channels)
            if not man.get("keep"):
                shutil.rmtree(jdir)
            k += 1
            job = gen.send(y)
    except StopIteration as stop:
        res = stop.value
    torch.save({"acts": {t: v.numpy() for t, v in res.env.items()},
                "scale": {g: v.numpy() for g, v in res.scale.items()},
                "active": {g: v.numpy() for g, v in res.active.items()},
                "bias": {g: v.numpy() for g, v in res.bias.items()},
                "cycles": cycles, "passed": passed, "compact": compact, "rtl_wall_s": rtl_wall,
                "runs": k}, out / "result.pt")
