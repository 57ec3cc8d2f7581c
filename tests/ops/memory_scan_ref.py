"""Token-loop oracle for the linear memory scan, shared by the kernel tests.

Plain per-token recurrence with the gradient anchor refreshed at absolute multiples of the chunk
size; written independently of the chunked forms it checks.
"""

import torch


def linear_memory_scan_loop(q, k, v, lr, momentum, decay, W, S, W_anchor=None, chunk_size=16, offset=0):
    """q, k [b, l, h, dk]; v [b, l, h, dv]; lr/momentum/decay [b, l, h]; W, S, W_anchor [b, h, dv, dk].

    Returns y [b, l, h, dv] and the final (W, S, W_anchor); W_anchor is the anchor of the chunk
    holding the last token (a caller continuing at a chunk boundary does not need it).
    """
    L = q.shape[1]
    A = W_anchor
    ys = []
    for t in range(L):
        if (offset + t) % chunk_size == 0:
            A = W
        kt, qt, vt = k[:, t], q[:, t], v[:, t]  # [b, h, d]
        r = torch.einsum("bhvk,bhk->bhv", A, kt) - vt
        u = 2.0 * r[..., :, None] * kt[..., None, :]
        S = momentum[:, t, :, None, None] * S - lr[:, t, :, None, None] * u
        W = (1.0 - decay[:, t, :, None, None]) * W + S
        ys.append(torch.einsum("bhvk,bhk->bhv", A, qt))
    y = torch.stack(ys, dim=1) if ys else v.new_zeros(v.shape)
    return y, (W, S, A)


def scan_in_pieces(scan, inputs, lengths, chunk_size):
    """Feed inputs (q, k, v, lr, momentum, decay, W, S) to `scan` (the op's signature) in consecutive
    pieces of `lengths` tokens, the state (W, S, W_anchor) and the chunk offset carried.

    Returns y [b, sum(lengths), h, dv] and the final (W, S).
    """
    *seqs, W, S = inputs
    ys, A, pos = [], None, 0
    for n in lengths:
        pieces = [t[:, pos : pos + n] for t in seqs]
        y, (W, S, A) = scan(*pieces, W, S, A, chunk_size=chunk_size, offset=pos % chunk_size)
        ys.append(y)
        pos += n
    return torch.cat(ys, 1), (W, S)


def random_inputs(b, L, h, dk, dv, device="cpu", dtype=torch.float64, seed=None):
    """Fresh random inputs in the op's working range (unit-norm keys and queries, gates in (0, 1))."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else seed)

    def rn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def ru(*shape, lo, hi):
        return lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=torch.float64)

    q = torch.nn.functional.normalize(rn(b, L, h, dk), dim=-1)
    k = torch.nn.functional.normalize(rn(b, L, h, dk), dim=-1)
    v = rn(b, L, h, dv)
    lr = ru(b, L, h, lo=0.01, hi=0.3)
    mom = ru(b, L, h, lo=0.5, hi=0.99)
    dec = ru(b, L, h, lo=0.0, hi=0.1)
    W = 0.1 * rn(b, h, dv, dk)
    S = 0.1 * rn(b, h, dv, dk)
    A = 0.1 * rn(b, h, dv, dk)
    out = [q, k, v, lr, mom, dec, W, S, A]
    return [t.to(device=device, dtype=dtype) for t in out]
