"""The released LLaDA ``generate()`` (ML-GSAI/LLaDA generate.py) copied line by line: the
independent reference our samplers are checked against, token for token."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def released_generate(model, prompt, steps, gen_length, block_length, cfg_scale=0.0, record=None,
                      eos_eot=None, *, mask_id):
    """The released LLaDA ``generate()`` (ML-GSAI/LLaDA generate.py), line by line.

    Low-confidence remasking at temperature 0 (``add_gumbel_noise`` returns the logits), with
    ``model(x).logits`` read as ``model(x)`` (LLaDAModel returns the tensor) and
    ``mask_id`` given. ``record`` (a list), when given, receives per step the p(MASK) of the
    masked positions and how many of them had mask_id as the argmax (the released loop would
    commit MASK there, so our guard would differ). ``eos_eot`` = (EOS id, EoT id) turns on
    ``confidence_eos_eot_inf``: both logits -inf after the argmax, before the softmax.
    """
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, : prompt.shape[1]] = prompt.clone()
    prompt_index = x != mask_id
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps = steps // num_blocks
    for num_block in range(num_blocks):
        block_mask_index = (
            x[:, prompt.shape[1] + num_block * block_length : prompt.shape[1] + (num_block + 1) * block_length]
            == mask_id
        )
        # get_num_transfer_tokens
        mask_num = block_mask_index.sum(dim=1, keepdim=True)
        base, remainder = mask_num // steps, mask_num % steps
        num_transfer_tokens = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + base
        for i in range(mask_num.size(0)):
            num_transfer_tokens[i, : remainder[i]] += 1
        for i in range(steps):
            mask_index = x == mask_id
            if cfg_scale > 0.0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                x_ = torch.cat([x, un_x], dim=0)
                logits = model(x_)
                logits, un_logits = torch.chunk(logits, 2, dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model(x)
            logits_with_noise = logits  # add_gumbel_noise at temperature 0
            x0 = torch.argmax(logits_with_noise, dim=-1)  # b, l
            if eos_eot is not None:  # confidence_eos_eot_inf
                logits_with_noise[:, :, eos_eot[0]] = logits[:, :, eos_eot[1]] = -torch.inf
            p = F.softmax(logits.to(torch.float64), dim=-1)  # MASK is in the denominator
            x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)  # b, l
            if record is not None:
                record.append((p[..., mask_id][mask_index], int((mask_index & (x0 == mask_id)).sum())))
            x0_p[:, prompt.shape[1] + (num_block + 1) * block_length :] = -np.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -np.inf)
            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                _, select_index = torch.topk(confidence[j], k=num_transfer_tokens[j, i])
                transfer_index[j, select_index] = True
            x[transfer_index] = x0[transfer_index]
    return x
