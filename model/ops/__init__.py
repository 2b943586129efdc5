"""The model's recurrences as ops, each in its own package with its implementations side by
side, as mamba-ssm's ``ops/`` and flash-linear-attention's ``fla/ops/<op>/`` keep theirs:

    reference.py       the equations, straight from the paper or the oracle library: the
                       test oracle
    torch_loop.py      the loop in torch ops (torch_scans.py for the selective scan): any
                       device, the fallback
    numba_kernel.py    the CPU kernel, compiled by numba at run time
    triton_kernel.py   the GPU kernel, compiled by Triton at run time (tested on the CPU
                       under TRITON_INTERPRET=1)
    interface.py       the op: a ``torch.library`` custom op (``lsnn::...``) with a fake
                       implementation and a backward, and the dispatch by ``impl``

- ``cfc``: the fused CfC scan (``--cfc-impl``);
- ``lif``: leaky integrate-and-fire neurons (``--lif-impl``);
- ``selective_scan``: Mamba's selective scan (``--scan-impl``), with the CPU's fused mixer;
- ``discounted_cumsum``: linear recurrences with a constant decay (the LIF's backward, the
  spike filters, STDP's traces).

``numba_support`` and ``triton_support`` hold what the kernels share; ``op_support`` makes a
recurrence's pair of custom ops, and the plain ``autograd.Function`` that eager calls run
instead of them (the ops' Python wrappers cost 20 to 30 µs a call each way). ``model.ops``
never imports the modules that use it.
"""
