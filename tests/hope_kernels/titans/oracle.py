"""Token-by-token oracle of the Titans memory, written straight from SPEC §2 v2 with explicit matrices.

It shares no code with `hope_kernels.titans.reference`: every memory block is updated by its own printed rule
    g^X_t = (E_X + X_c) u_t k_tᵀ,   X_t = X_{t-1} (alpha_t I - eps eta_t k_t k_tᵀ) - eta_t g^X_t
(with momentum S_t = beta S_{t-1} - eta_t g_t, X_t = X_{t-1}(...) + S_t); with memory_retention="init" the
retention term alpha_t X_{t-1} becomes X_0 + alpha_t (X_{t-1} - X_0), and memory_value_norm l2-normalises v_t.
Tests only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ALL = ("k", "v", "eta", "alpha")


def titans_oracle(q, a, z0, b_eta, b_alpha, momentum_logit=None, *, chunk_size, eta_max, adaptive_chunk_size=None,
                  momentum=False, dgd=True, objective="l2", memory_target="self", memory_residual=True,
                  memory_value_norm=True, memory_retention="init", adaptive=ALL, mask=None, state=None, output_final_state=False):
    """Same signature and outputs as `titans_memory_reference`; float64 throughout."""
    B, T, H, d = q.shape
    f64 = torch.float64
    q, a = q.to(f64), a.to(f64)
    Ca = adaptive_chunk_size or chunk_size
    r = 1.0 if memory_residual else 0.0
    eye = torch.eye(d, dtype=f64)
    if state is None:
        z = z0.to(f64).unsqueeze(0).repeat(B, 1, 1, 1)
        zc, s, position = z.clone(), torch.zeros_like(z), 0
    else:
        zc, z, position = state.z_chunk.to(f64).clone(), state.z.to(f64).clone(), state.position
        s = torch.zeros_like(z) if state.s is None else state.s.to(f64).clone()
    beta = torch.sigmoid(momentum_logit.to(f64)) if momentum else None
    blocks = {"W": slice(0, d), "k": slice(d, 2 * d), "v": slice(2 * d, 3 * d), "eta": slice(3 * d, 3 * d + 1),
              "alpha": slice(3 * d + 1, 3 * d + 2)}
    learns = {"W": True, **{name: name in adaptive for name in ALL}}
    square = {"W": True, "k": True, "v": True, "eta": False, "alpha": False}
    out = torch.zeros(B, T, H, d, dtype=f64)
    for t in range(T):
        for b in range(B):
            for h in range(H):
                at, qt = a[b, t, h], q[b, t, h]
                Wk, Wv = zc[b, h, blocks["k"]], zc[b, h, blocks["v"]]
                w_eta, w_alpha = zc[b, h, 3 * d], zc[b, h, 3 * d + 1]
                k = F.normalize(r * at + Wk @ at, dim=0)
                v = r * at + Wv @ at
                if memory_value_norm:
                    v = F.normalize(v, dim=0)
                eta = eta_max * torch.sigmoid(w_eta @ at + b_eta[h].to(f64))
                alpha = torch.sigmoid(w_alpha @ at + b_alpha[h].to(f64))
                valid = mask is None or bool(mask[b, t] > 0)
                if valid:
                    u = k - v if objective == "l2" else -v
                    P = alpha * eye - (eta if dgd else 0.0) * torch.outer(k, k)
                    for name, rows in blocks.items():
                        if not learns[name]:
                            continue
                        Xc = zc[b, h, rows]
                        # X_{t-1} P, with the retention part alpha X_{t-1} pulled toward X_0 instead of 0
                        anchor_term = (1 - alpha) * z0[h, rows].to(f64) if memory_retention == "init" else 0.0
                        E = r * eye if square[name] else torch.zeros(1, d, dtype=f64)
                        if name == "W" and memory_target == "value":
                            err = (E + Xc) @ k - v if objective == "l2" else -v
                        else:
                            err = (E + Xc) @ u
                        g = torch.outer(err, k)
                        if momentum:
                            s[b, h, rows] = beta[h] * s[b, h, rows] - eta * g
                            z[b, h, rows] = z[b, h, rows] @ P + anchor_term + s[b, h, rows]
                        else:
                            z[b, h, rows] = z[b, h, rows] @ P + anchor_term - eta * g
                out[b, t, h] = r * qt + z[b, h, blocks["W"]] @ qt
        pos = position + t + 1
        if pos % chunk_size == 0:
            zc[:, :, :d] = z[:, :, :d]
        if pos % Ca == 0:
            zc[:, :, d:] = z[:, :, d:]
    final = None
    if output_final_state:
        from hope_kernels.titans import TitansState

        final = TitansState(zc, z, s if momentum else None, position + T)
    return out, final
