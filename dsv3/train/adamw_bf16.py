"""AdamW whose first and second moments are stored in BF16 (report §3.3: "we adopt BF16 instead of FP32
to track the first and second moments in the AdamW optimizer, without incurring observable performance
degradation").  Parameters and gradients stay as they are (fp32 master weights in dsv3).

Per parameter and step, in fp32: m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g²;  then both are rounded to
BF16 for storage, and the update uses the fp32 values before rounding:
    p = p (1 - lr wd) - lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)
which is torch.optim.AdamW's rule, so with fp32 storage the two agree (tests/test_optim.py holds it to
a float64 twin that rounds its moments the same way).  BF16 keeps fp32's exponent range, so tiny second
moments do not underflow; their 8-bit mantissa costs ~0.4 % relative error per stored value.

Memory: 4 bytes per parameter for the two moments instead of 8.  Speed: one parameter at a time with
torch ops (each step makes fp32 temporaries of one parameter's size); the fused torch AdamW stays the
default (`TrainConfig.moments = "fp32"`).
"""

from __future__ import annotations

import torch


class AdamWBF16Moments(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        if not 0.0 <= lr or not 0.0 <= eps or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid AdamW hyper-parameters: lr {lr}, betas {betas}, eps {eps}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16, memory_format=torch.preserve_format)
                state["step"] += 1
                t = int(state["step"].item())  # a host read, once per parameter: the step count lives on the CPU
                g = p.grad.float()
                m = state["exp_avg"].float().mul_(b1).add_(g, alpha=1 - b1)
                v = state["exp_avg_sq"].float().mul_(b2).addcmul_(g, g, value=1 - b2)
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)
                denom = v.div_(1 - b2 ** t).sqrt_().add_(eps)
                p.mul_(1 - lr * wd)
                p.addcdiv_(m.to(p.dtype), denom.to(p.dtype), value=-lr / (1 - b1 ** t))
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """torch casts loaded floating-point state to each parameter's dtype: cast the moments back."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(torch.bfloat16)
            if "step" in state:
                state["step"] = state["step"].float().cpu()

