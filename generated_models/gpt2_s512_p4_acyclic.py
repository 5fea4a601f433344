# python -m autopipe.partition nlp --model gpt2 -p 4 -b 8 --seq_len 512
"""gpt2_s512 split into 4 pipeline stages.

Each ``StageK`` holds the original model's layers for its part, registered under the original
qualified names, so ``StageK().state_dict()`` keys are the original model's keys. ``PIPELINE``
says what each stage receives and sends. ``build_stages(state_dict)`` builds the stages with the
original model's weights; ``merge_state_dicts`` joins the stages' state dicts back into one.

Analysis (predicted)
flops profile on v100, batch 8, 12 GB/s links, 4 microbatches
stage    fwd ms    bwd ms  params MB    in MB   out MB  comm ms  memory GB
    0     21.43     61.99     270.94     0.00    12.58     2.10      1.578
    1     21.34     61.60     113.41    12.58    12.58     2.10      1.105
    2     21.34     61.60     113.41    12.58    12.58     2.10      1.102
    3     20.17     60.49     154.40    12.58     0.00     0.00      0.675
slowest stage 85.51 ms per batch, lower bound 82.49 ms (ratio 1.037); one device 329.95 ms
gpipe with 4 microbatches: 148.20 ms per batch, 54.0 samples/s, 2.23x one device, peak memory 1.578 GB
1f1b with 4 microbatches: 148.20 ms per batch, 54.0 samples/s, 2.23x one device, peak memory 1.578 GB
"""

import torch
import torch.nn.functional as F
from torch import nn


class Stage0(nn.Module):
    """Stage 0: from wte to h.3.mlp.dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(50257, 768)
        self.wpe = nn.Embedding(1024, 768)
        self.drop = nn.Dropout(p=0.1)
        self.h = nn.ModuleDict(
            {
                "0": nn.ModuleDict(
                    {
                        "ln_1": nn.LayerNorm(768),
                        "attn": nn.ModuleDict(
                            {
                                "c_attn": nn.Linear(768, 2304),
                                "attn_dropout": nn.Dropout(p=0.1),
                                "c_proj": nn.Linear(768, 768),
                                "resid_dropout": nn.Dropout(p=0.1),
                            }
                        ),
                        "ln_2": nn.LayerNorm(768),
                        "mlp": nn.ModuleDict(
                            {
                                "c_fc": nn.Linear(768, 3072),
                                "act": nn.GELU(approximate="tanh"),
                                "c_proj": nn.Linear(3072, 768),
                                "dropout": nn.Dropout(p=0.1),
                            }
                        ),
                    }
                ),
                "1": nn.ModuleDict(
                    {
                        "ln_1": nn.LayerNorm(768),
                        "attn": nn.ModuleDict(
                            {
                                "c_attn": nn.Linear(768, 2304),
                                "attn_dropout": nn.Dropout(p=0.1),
                                "c_proj": nn.Linear(768, 768),
                                "resid_dropout": nn.Dropout(p=0.1),
                            }
                        ),
                        "ln_2": nn.LayerNorm(768),
                        "mlp": nn.ModuleDict(
                            {
                                "c_fc": nn.Linear(768, 3072),
                                "act": nn.GELU(approximate="tanh"),
                                "c_proj": nn.Linear(3072, 768),
                                "dropout": nn.Dropout(p=0.1),
                            }
                        ),
                    }
                ),
                "2": nn.ModuleDict(
                    {
                        "ln_1": nn.LayerNorm(768),
                        "attn": nn.ModuleDict(
                            {
                                "c_attn": nn.Linear(768, 2304),
                                "attn_dropout": nn.Dropout(p=0.1),
                                "c_proj": nn.Linear(768, 768),
                                "resid_dropout": nn.Dropout(p=0.1),
                            }
                        ),
                        "ln_2": nn.LayerNorm(768),
                        "mlp": nn.ModuleDict(
                            {
                                "c_fc": nn.Linear(768, 3072),
                                "act": nn.GELU(approximate="tanh"),
                                "c_proj": nn.Linear(3072, 768),
                                "dropout": nn.Dropout(p=0.1),
                            }
                        ),
                    }
                ),
                "3": nn.ModuleDict(
                    {
                        "ln_1": nn.LayerNorm(768),
                        "attn": nn.ModuleDict(
                            {
                                "c_attn": nn.Linear(768, 2304),
                                "attn_dropout": nn.Dropout(p=0.1),
                                "c_proj": nn.Linear(768, 768),
                                "resid_dropout": nn.Dropout(p=0.1),
                            }
                        ),
                        "ln_2": nn.LayerNorm(768),
                        "mlp": nn.ModuleDict(
                            {
                                "c_fc": nn.Linear(768, 3072),
                                "act": nn.GELU(approximate="tanh"),
                                "c_proj": nn.Linear(3072, 768),
                                "dropout": nn.Dropout(p=0.1),
                            }
                        ),
                    }
                ),
            }
        )

    def forward(self, input_ids) -> tuple:
        size = input_ids.size(1)  # GPT2LMHeadModel
        getattr_1 = input_ids.device  # GPT2LMHeadModel
        arange = torch.arange(size, device=getattr_1)  # GPT2LMHeadModel
        wte = self.wte(input_ids)  # wte
        wpe = self.wpe(arange)  # wpe
        add = wte + wpe  # GPT2LMHeadModel
        drop = self.drop(add)  # drop
        h_0_ln_1 = self.h["0"].ln_1(drop)  # h.0.ln_1
        h_0_attn_c_attn = self.h["0"].attn.c_attn(h_0_ln_1)  # h.0.attn.c_attn
        split = h_0_attn_c_attn.split(768, dim=-1)  # h.0.attn (GPT2Attention)
        getitem = split[0]  # h.0.attn (GPT2Attention)
        getitem_1 = split[1]  # h.0.attn (GPT2Attention)
        getitem_2 = split[2]  # h.0.attn (GPT2Attention)
        unflatten = getitem.unflatten(-1, (12, -1))  # h.0.attn (GPT2Attention)
        transpose = unflatten.transpose(1, 2)  # h.0.attn (GPT2Attention)
        unflatten_1 = getitem_1.unflatten(-1, (12, -1))  # h.0.attn (GPT2Attention)
        transpose_1 = unflatten_1.transpose(1, 2)  # h.0.attn (GPT2Attention)
        unflatten_2 = getitem_2.unflatten(-1, (12, -1))  # h.0.attn (GPT2Attention)
        transpose_2 = unflatten_2.transpose(1, 2)  # h.0.attn (GPT2Attention)
        size_1 = h_0_ln_1.size(1)  # h.0.attn (GPT2Attention)
        getattr_2 = h_0_ln_1.device  # h.0.attn (GPT2Attention)
        arange_1 = torch.arange(size_1, device=getattr_2)  # h.0.attn (GPT2Attention)
        getitem_3 = arange_1[None, :]  # h.0.attn (GPT2Attention)
        getitem_4 = arange_1[:, None]  # h.0.attn (GPT2Attention)
        gt = getitem_3 > getitem_4  # h.0.attn (GPT2Attention)
        transpose_3 = transpose_1.transpose(-2, -1)  # h.0.attn (GPT2Attention)
        matmul = transpose @ transpose_3  # h.0.attn (GPT2Attention)
        mul = matmul * 0.125  # h.0.attn (GPT2Attention)
        masked_fill = mul.masked_fill(gt, float("-inf"))  # h.0.attn (GPT2Attention)
        softmax = masked_fill.softmax(dim=-1)  # h.0.attn (GPT2Attention)
        h_0_attn_attn_dropout = self.h["0"].attn.attn_dropout(softmax)  # h.0.attn.attn_dropout
        matmul_1 = h_0_attn_attn_dropout @ transpose_2  # h.0.attn (GPT2Attention)
        transpose_4 = matmul_1.transpose(1, 2)  # h.0.attn (GPT2Attention)
        flatten = transpose_4.flatten(2)  # h.0.attn (GPT2Attention)
        h_0_attn_c_proj = self.h["0"].attn.c_proj(flatten)  # h.0.attn.c_proj
        h_0_attn_resid_dropout = self.h["0"].attn.resid_dropout(
            h_0_attn_c_proj
        )  # h.0.attn.resid_dropout
        add_1 = drop + h_0_attn_resid_dropout  # h.0 (GPT2Block)
        h_0_ln_2 = self.h["0"].ln_2(add_1)  # h.0.ln_2
        h_0_mlp_c_fc = self.h["0"].mlp.c_fc(h_0_ln_2)  # h.0.mlp.c_fc
        h_0_mlp_act = self.h["0"].mlp.act(h_0_mlp_c_fc)  # h.0.mlp.act
        h_0_mlp_c_proj = self.h["0"].mlp.c_proj(h_0_mlp_act)  # h.0.mlp.c_proj
        h_0_mlp_dropout = self.h["0"].mlp.dropout(h_0_mlp_c_proj)  # h.0.mlp.dropout
        add_2 = add_1 + h_0_mlp_dropout  # h.0 (GPT2Block)
        h_1_ln_1 = self.h["1"].ln_1(add_2)  # h.1.ln_1
        h_1_attn_c_attn = self.h["1"].attn.c_attn(h_1_ln_1)  # h.1.attn.c_attn
        split_1 = h_1_attn_c_attn.split(768, dim=-1)  # h.1.attn (GPT2Attention)
        getitem_5 = split_1[0]  # h.1.attn (GPT2Attention)
        getitem_6 = split_1[1]  # h.1.attn (GPT2Attention)
        getitem_7 = split_1[2]  # h.1.attn (GPT2Attention)
        unflatten_3 = getitem_5.unflatten(-1, (12, -1))  # h.1.attn (GPT2Attention)
        transpose_5 = unflatten_3.transpose(1, 2)  # h.1.attn (GPT2Attention)
        unflatten_4 = getitem_6.unflatten(-1, (12, -1))  # h.1.attn (GPT2Attention)
        transpose_6 = unflatten_4.transpose(1, 2)  # h.1.attn (GPT2Attention)
        unflatten_5 = getitem_7.unflatten(-1, (12, -1))  # h.1.attn (GPT2Attention)
        transpose_7 = unflatten_5.transpose(1, 2)  # h.1.attn (GPT2Attention)
        size_2 = h_1_ln_1.size(1)  # h.1.attn (GPT2Attention)
        getattr_3 = h_1_ln_1.device  # h.1.attn (GPT2Attention)
        arange_2 = torch.arange(size_2, device=getattr_3)  # h.1.attn (GPT2Attention)
        getitem_8 = arange_2[None, :]  # h.1.attn (GPT2Attention)
        getitem_9 = arange_2[:, None]  # h.1.attn (GPT2Attention)
        gt_1 = getitem_8 > getitem_9  # h.1.attn (GPT2Attention)
        transpose_8 = transpose_6.transpose(-2, -1)  # h.1.attn (GPT2Attention)
        matmul_2 = transpose_5 @ transpose_8  # h.1.attn (GPT2Attention)
        mul_1 = matmul_2 * 0.125  # h.1.attn (GPT2Attention)
        masked_fill_1 = mul_1.masked_fill(gt_1, float("-inf"))  # h.1.attn (GPT2Attention)
        softmax_1 = masked_fill_1.softmax(dim=-1)  # h.1.attn (GPT2Attention)
        h_1_attn_attn_dropout = self.h["1"].attn.attn_dropout(softmax_1)  # h.1.attn.attn_dropout
        matmul_3 = h_1_attn_attn_dropout @ transpose_7  # h.1.attn (GPT2Attention)
        transpose_9 = matmul_3.transpose(1, 2)  # h.1.attn (GPT2Attention)
        flatten_1 = transpose_9.flatten(2)  # h.1.attn (GPT2Attention)
        h_1_attn_c_proj = self.h["1"].attn.c_proj(flatten_1)  # h.1.attn.c_proj
        h_1_attn_resid_dropout = self.h["1"].attn.resid_dropout(
            h_1_attn_c_proj
        )  # h.1.attn.resid_dropout
        add_3 = add_2 + h_1_attn_resid_dropout  # h.1 (GPT2Block)
        h_1_ln_2 = self.h["1"].ln_2(add_3)  # h.1.ln_2
        h_1_mlp_c_fc = self.h["1"].mlp.c_fc(h_1_ln_2)  # h.1.mlp.c_fc
        h_1_mlp_act = self.h["1"].mlp.act(h_1_mlp_c_fc)  # h.1.mlp.act
        h_1_mlp_c_proj = self.h["1"].mlp.c_proj(h_1_mlp_act)  # h.1.mlp.c_proj
        h_1_mlp_dropout = self.h["1"].mlp.dropout(h_1_mlp_c_proj)  # h.1.mlp.dropout
        add_4 = add_3 + h_1_mlp_dropout  # h.1 (GPT2Block)
        h_2_ln_1 = self.h["2"].ln_1(add_4)  # h.2.ln_1
        h_2_attn_c_attn = self.h["2"].attn.c_attn(h_2_ln_1)  # h.2.attn.c_attn
        split_2 = h_2_attn_c_attn.split(768, dim=-1)  # h.2.attn (GPT2Attention)
        getitem_10 = split_2[0]  # h.2.attn (GPT2Attention)
        getitem_11 = split_2[1]  # h.2.attn (GPT2Attention)
        getitem_12 = split_2[2]  # h.2.attn (GPT2Attention)
        unflatten_6 = getitem_10.unflatten(-1, (12, -1))  # h.2.attn (GPT2Attention)
        transpose_10 = unflatten_6.transpose(1, 2)  # h.2.attn (GPT2Attention)
        unflatten_7 = getitem_11.unflatten(-1, (12, -1))  # h.2.attn (GPT2Attention)
        transpose_11 = unflatten_7.transpose(1, 2)  # h.2.attn (GPT2Attention)
        unflatten_8 = getitem_12.unflatten(-1, (12, -1))  # h.2.attn (GPT2Attention)
        transpose_12 = unflatten_8.transpose(1, 2)  # h.2.attn (GPT2Attention)
        size_3 = h_2_ln_1.size(1)  # h.2.attn (GPT2Attention)
        getattr_4 = h_2_ln_1.device  # h.2.attn (GPT2Attention)
        arange_3 = torch.arange(size_3, device=getattr_4)  # h.2.attn (GPT2Attention)
        getitem_13 = arange_3[None, :]  # h.2.attn (GPT2Attention)
        getitem_14 = arange_3[:, None]  # h.2.attn (GPT2Attention)
        gt_2 = getitem_13 > getitem_14  # h.2.attn (GPT2Attention)
        transpose_13 = transpose_11.transpose(-2, -1)  # h.2.attn (GPT2Attention)
        matmul_4 = transpose_10 @ transpose_13  # h.2.attn (GPT2Attention)
        mul_2 = matmul_4 * 0.125  # h.2.attn (GPT2Attention)
        masked_fill_2 = mul_2.masked_fill(gt_2, float("-inf"))  # h.2.attn (GPT2Attention)
        softmax_2 = masked_fill_2.softmax(dim=-1)  # h.2.attn (GPT2Attention)
        h_2_attn_attn_dropout = self.h["2"].attn.attn_dropout(softmax_2)  # h.2.attn.attn_dropout
        matmul_5 = h_2_attn_attn_dropout @ transpose_12  # h.2.attn (GPT2Attention)
        transpose_14 = matmul_5.transpose(1, 2)  # h.2.attn (GPT2Attention)
        flatten_2 = transpose_14.flatten(2)  # h.2.attn (GPT2Attention)
        h_2_attn_c_proj = self.h["2"].attn.c_proj(flatten_2)  # h.2.attn.c_proj
        h_2_attn_resid_dropout = self.h["2"].attn.resid_dropout(
            h_2_attn_c_proj
        )  # h.2.attn.resid_dropout
        add_5 = add_4 + h_2_attn_resid_dropout  # h.2 (GPT2Block)
        h_2_ln_2 = self.h["2"].ln_2(add_5)  # h.2.ln_2
        h_2_mlp_c_fc = self.h["2"].mlp.c_fc(h_2_ln_2)  # h.2.mlp.c_fc
        h_2_mlp_act = self.h["2"].mlp.act(h_2_mlp_c_fc)  # h.2.mlp.act
        h_2_mlp_c_proj = self.h["2"].mlp.c_proj(h_2_mlp_act)  # h.2.mlp.c_proj
        h_2_mlp_dropout = self.h["2"].mlp.dropout(h_2_mlp_c_proj)  # h.2.mlp.dropout
        add_6 = add_5 + h_2_mlp_dropout  # h.2 (GPT2Block)
        h_3_ln_1 = self.h["3"].ln_1(add_6)  # h.3.ln_1
        h_3_attn_c_attn = self.h["3"].attn.c_attn(h_3_ln_1)  # h.3.attn.c_attn
        split_3 = h_3_attn_c_attn.split(768, dim=-1)  # h.3.attn (GPT2Attention)
        getitem_15 = split_3[0]  # h.3.attn (GPT2Attention)
        getitem_16 = split_3[1]  # h.3.attn (GPT2Attention)
        getitem_17 = split_3[2]  # h.3.attn (GPT2Attention)
        unflatten_9 = getitem_15.unflatten(-1, (12, -1))  # h.3.attn (GPT2Attention)
        transpose_15 = unflatten_9.transpose(1, 2)  # h.3.attn (GPT2Attention)
        unflatten_10 = getitem_16.unflatten(-1, (12, -1))  # h.3.attn (GPT2Attention)
        transpose_16 = unflatten_10.transpose(1, 2)  # h.3.attn (GPT2Attention)
        unflatten_11 = getitem_17.unflatten(-1, (12, -1))  # h.3.attn (GPT2Attention)
        transpose_17 = unflatten_11.transpose(1, 2)  # h.3.attn (GPT2Attention)
        size_4 = h_3_ln_1.size(1)  # h.3.attn (GPT2Attention)
        getattr_5 = h_3_ln_1.device  # h.3.attn (GPT2Attention)
        arange_4 = torch.arange(size_4, device=getattr_5)  # h.3.attn (GPT2Attention)
        getitem_18 = arange_4[None, :]  # h.3.attn (GPT2Attention)
        getitem_19 = arange_4[:, None]  # h.3.attn (GPT2Attention)
        gt_3 = getitem_18 > getitem_19  # h.3.attn (GPT2Attention)
        transpose_18 = transpose_16.transpose(-2, -1)  # h.3.attn (GPT2Attention)
        matmul_6 = transpose_15 @ transpose_18  # h.3.attn (GPT2Attention)
        mul_3 = matmul_6 * 0.125  # h.3.attn (GPT2Attention)
        masked_fill_3 = mul_3.masked_fill(gt_3, float("-inf"))  # h.3.attn (GPT2Attention)
        softmax_3 = masked_fill_3.softmax(dim=-1)  # h.3.attn (GPT2Attention)
        h_3_attn_attn_dropout = self.h["3"].attn.attn_dropout(softmax_3)  # h.3.attn.attn_dropout
        matmul_7 = h_3_attn_attn_dropout @ transpose_17  # h.3.attn (GPT2Attention)
        transpose_19 = matmul_7.transpose(1, 2)  # h.3.attn (GPT2Attention)
        flatten_3 = transpose_19.flatten(2)  # h.3.attn (GPT2Attention)
        h_3_attn_c_proj = self.h["3"].attn.c_proj(flatten_3)  # h.3.attn.c_proj
        h_3_attn_resid_dropout = self.h["3"].attn.resid_dropout(
            h_3_attn_c_proj
        )  # h.3.attn.resid_dropout
        add_7 = add_6 + h_3_attn_resid_dropout  # h.3 (GPT2Block)
        h_3_ln_2 = self.h["3"].ln_2(add_7)  # h.3.ln_2
        h_3_mlp_c_fc = self.h["3"].mlp.c_fc(h_3_ln_2)  # h.3.mlp.c_fc
        h_3_mlp_act = self.h["3"].mlp.act(h_3_mlp_c_fc)  # h.3.mlp.act
        h_3_mlp_c_proj = self.h["3"].mlp.c_proj(h_3_mlp_act)  # h.3.mlp.c_proj
        h_3_mlp_dropout = self.h["3"].mlp.dropout(h_3_mlp_c_proj)  # h.3.mlp.dropout
        add_8 = add_7 + h_3_mlp_dropout  # h.3 (GPT2Block)
        return (add_8,)


class Stage1(nn.Module):
    """Stage 1: from h.4.ln_1 to h.7.mlp.dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.h = nn.ModuleDict(
            {
                "4": nn.ModuleDict(
                    {
                        "ln_1": nn.LayerNorm(768),
                        "attn": nn.ModuleDict(
                            {
                                "c_attn": nn.Linear(768, 2304),
                                "attn_dropout": nn.Dropout(p=0.1),
                                "c_proj": nn.Linear(768, 768),
                                "resid_dropout": nn.Dropout(p=0.1),
                            }
                        ),
                        "ln_2": nn.LayerNorm(768),
                        "mlp": nn.ModuleDict(
                            {
                                "c_fc": nn.Linear(768, 3072),
                                "act": nn.GELU(approximate="tanh"),
                                "c_proj": nn.Linear(3072, 768),
                                "dropout": nn.Dropout(p=0.1),
                            }
                        ),
                    }
                ),
                "5": nn.ModuleDict(
                    {
                        "ln_1": nn.LayerNorm(768),
                        "attn": nn.ModuleDict(
                            {
                                "c_attn": nn.Linear(768, 2304),
                                "attn_dropout": nn.Dropout(p=0.1),
                                "c_proj": nn.Linear(768, 768),
                                "resid_dropout": nn.Dropout(p=0.1),
                            }
                        ),
                        "ln_2": nn.LayerNorm(768),
                        "mlp": nn.ModuleDict(
                            {
                                "c_fc": nn.Linear(768, 3072),
                                "act": nn.GELU(approximate="tanh"),
                                "c_proj": nn.Linear(3072, 768),
                                "dropout": nn.Dropout(p=0.1),
                            }
                        ),
                    }
                ),
                "6": nn.ModuleDict(
                    {
                        "ln_1": nn.LayerNorm(768),
                        "attn": nn.ModuleDict(
                            {
                                "c_attn": nn.Linear(768, 2304),
                                "attn_dropout": nn.Dropout(p=0.1),
                                "c_proj": nn.Linear(768, 768),
                                "resid_dropout": nn.Dropout(p=0.1),
                            }
                        ),
                        "ln_2": nn.LayerNorm(768),
                        "mlp": nn.ModuleDict(
                            {
                                "c_fc": nn.Linear(768, 3072),
                                "act": nn.GELU(approximate="tanh"),
                                "c_proj": nn.Linear(3072, 768),
                                "dropout": nn.Dropout(p=0.1),
                            }
                        ),
                    }
                ),
                "7": nn.ModuleDict(
                    {
                        "ln_1": nn.LayerNorm(768),
                        "attn": nn.ModuleDict(
                            {
                                "c_attn": nn.Linear(768, 2304),
                                "attn_dropout": nn.Dropout(p=0.1),
                                "c_proj": nn.Linear(768, 768),
                                "resid_dropout": nn.Dropout(p=0.1),
                            }
                        ),
                        "ln_2": nn.LayerNorm(768),
                        "mlp": nn.ModuleDict(
                            {
                                "c_fc": nn.Linear(768, 3072),
                                "act": nn.GELU(approximate="tanh"),
                                "c_proj": nn.Linear(3072, 768),
                                "dropout": nn.Dropout(p=0.1),
                            }
                        ),
                    }
                ),
            }
        )

    def forward(self, add_8) -> tuple:
        h_4_ln_1 = self.h["4"].ln_1(add_8)  # h.4.ln_1
        h_4_attn_c_attn = self.h["4"].attn.c_attn(h_4_ln_1)  # h.4.attn.c_attn
        split_4 = h_4_attn_c_attn.split(768, dim=-1)  # h.4.attn (GPT2Attention)
        getitem_20 = split_4[0]  # h.4.attn (GPT2Attention)
        getitem_21 = split_4[1]  # h.4.attn (GPT2Attention)
        getitem_22 = split_4[2]  # h.4.attn (GPT2Attention)
        unflatten_12 = getitem_20.unflatten(-1, (12, -1))  # h.4.attn (GPT2Attention)
        transpose_20 = unflatten_12.transpose(1, 2)  # h.4.attn (GPT2Attention)
        unflatten_13 = getitem_21.unflatten(-1, (12, -1))  # h.4.attn (GPT2Attention)
        transpose_21 = unflatten_13.transpose(1, 2)  # h.4.attn (GPT2Attention)
        unflatten_14 = getitem_22.unflatten(-1, (12, -1))  # h.4.attn (GPT2Attention)
        transpose_22 = unflatten_14.transpose(1, 2)  # h.4.attn (GPT2Attention)
        size_5 = h_4_ln_1.size(1)  # h.4.attn (GPT2Attention)
        getattr_6 = h_4_ln_1.device  # h.4.attn (GPT2Attention)
        arange_5 = torch.arange(size_5, device=getattr_6)  # h.4.attn (GPT2Attention)
        getitem_23 = arange_5[None, :]  # h.4.attn (GPT2Attention)
        getitem_24 = arange_5[:, None]  # h.4.attn (GPT2Attention)
        gt_4 = getitem_23 > getitem_24  # h.4.attn (GPT2Attention)
        transpose_23 = transpose_21.transpose(-2, -1)  # h.4.attn (GPT2Attention)
        matmul_8 = transpose_20 @ transpose_23  # h.4.attn (GPT2Attention)
        mul_4 = matmul_8 * 0.125  # h.4.attn (GPT2Attention)
        masked_fill_4 = mul_4.masked_fill(gt_4, float("-inf"))  # h.4.attn (GPT2Attention)
        softmax_4 = masked_fill_4.softmax(dim=-1)  # h.4.attn (GPT2Attention)
        h_4_attn_attn_dropout = self.h["4"].attn.attn_dropout(softmax_4)  # h.4.attn.attn_dropout
        matmul_9 = h_4_attn_attn_dropout @ transpose_22  # h.4.attn (GPT2Attention)
        transpose_24 = matmul_9.transpose(1, 2)  # h.4.attn (GPT2Attention)
        flatten_4 = transpose_24.flatten(2)  # h.4.attn (GPT2Attention)
        h_4_attn_c_proj = self.h["4"].attn.c_proj(flatten_4)  # h.4.attn.c_proj
        h_4_attn_resid_dropout = self.h["4"].attn.resid_dropout(
            h_4_attn_c_proj
        )  # h.4.attn.resid_dropout
        add_9 = add_8 + h_4_attn_resid_dropout  # h.4 (GPT2Block)
        h_4_ln_2 = self.h["4"].ln_2(add_9)  # h.4.ln_2
        h_4_mlp_c_fc = self.h["4"].mlp.c_fc(h_4_ln_2)  # h.4.mlp.c_fc
        h_4_mlp_act = self.h["4"].mlp.act(h_4_mlp_c_fc)  # h.4.mlp.act
        h_4_mlp_c_proj = self.h["4"].mlp.c_proj(h_4_mlp_act)  # h.4.mlp.c_proj
        h_4_mlp_dropout = self.h["4"].mlp.dropout(h_4_mlp_c_proj)  # h.4.mlp.dropout
        add_10 = add_9 + h_4_mlp_dropout  # h.4 (GPT2Block)
        h_5_ln_1 = self.h["5"].ln_1(add_10)  # h.5.ln_1
        h_5_attn_c_attn = self.h["5"].attn.c_attn(h_5_ln_1)  # h.5.attn.c_attn
        split_5 = h_5_attn_c_attn.split(768, dim=-1)  # h.5.attn (GPT2Attention)
        getitem_25 = split_5[0]  # h.5.attn (GPT2Attention)
        getitem_26 = split_5[1]  # h.5.attn (GPT2Attention)
        getitem_27 = split_5[2]  # h.5.attn (GPT2Attention)
        unflatten_15 = getitem_25.unflatten(-1, (12, -1))  # h.5.attn (GPT2Attention)
        transpose_25 = unflatten_15.transpose(1, 2)  # h.5.attn (GPT2Attention)
        unflatten_16 = getitem_26.unflatten(-1, (12, -1))  # h.5.attn (GPT2Attention)
        transpose_26 = unflatten_16.transpose(1, 2)  # h.5.attn (GPT2Attention)
        unflatten_17 = getitem_27.unflatten(-1, (12, -1))  # h.5.attn (GPT2Attention)
        transpose_27 = unflatten_17.transpose(1, 2)  # h.5.attn (GPT2Attention)
        size_6 = h_5_ln_1.size(1)  # h.5.attn (GPT2Attention)
        getattr_7 = h_5_ln_1.device  # h.5.attn (GPT2Attention)
        arange_6 = torch.arange(size_6, device=getattr_7)  # h.5.attn (GPT2Attention)
        getitem_28 = arange_6[None, :]  # h.5.attn (GPT2Attention)
        getitem_29 = arange_6[:, None]  # h.5.attn (GPT2Attention)
        gt_5 = getitem_28 > getitem_29  # h.5.attn (GPT2Attention)
        transpose_28 = transpose_26.transpose(-2, -1)  # h.5.attn (GPT2Attention)
        matmul_10 = transpose_25 @ transpose_28  # h.5.attn (GPT2Attention)
        mul_5 = matmul_10 * 0.125  # h.5.attn (GPT2Attention)
        masked_fill_5 = mul_5.masked_fill(gt_5, float("-inf"))  # h.5.attn (GPT2Attention)
        softmax_5 = masked_fill_5.softmax(dim=-1)  # h.5.attn (GPT2Attention)
        h_5_attn_attn_dropout = self.h["5"].attn.attn_dropout(softmax_5)  # h.5.attn.attn_dropout
        matmul_11 = h_5_attn_attn_dropout @ transpose_27  # h.5.attn (GPT2Attention)
        transpose_29 = matmul_11.transpose(1, 2)  # h.5.attn (GPT2Attention)
        flatten_5 = transpose_29.flatten(2)  # h.5.attn (GPT2Attention)
        h_5_attn_c_proj = self.h["5"].attn.c_proj(flatten_5)  # h.5.attn.c_proj
        h_5_attn_resid_dropout = self.h["5"].attn.resid_dropout(
            h_5_attn_c_proj
        )  # h.5.attn.resid_dropout
        add_11 = add_10 + h_5_attn_resid_dropout  # h.5 (GPT2Block)
        h_5_ln_2 = self.h["5"].ln_2(add_11)  # h.5.ln_2
        h_5_mlp_c_fc = self.h["5"].mlp.c_fc(h_5_ln_2)  # h.5.mlp.c_fc
        h_5_mlp_act = self.h["5"].mlp.act(h_5_mlp_c_fc)  # h.5.mlp.act
        h_5_mlp_c_proj = self.h["5"].mlp.c_proj(h_5_mlp_act)  # h.5.mlp.c_proj
        h_5_mlp_dropout = self.h["5"].mlp.dropout(h_5_mlp_c_proj)  # h.5.mlp.dropout
        add_12 = add_11 + h_5_mlp_dropout  # h.5 (GPT2Block)
        h_6_ln_1 = self.h["6"].ln_1(add_12)  # h.6.ln_1
        h_6_attn_c_attn = self.h["6"].attn.c_attn(h_6_ln_1)  # h.6.attn.c_attn
        split_6 = h_6_attn_c_attn.split(768, dim=-1)  # h.6.attn (GPT2Attention)
        getitem_30 = split_6[0]  # h.6.attn (GPT2Attention)
        getitem_31 = split_6[1]  # h.6.attn (GPT2Attention)
        getitem_32 = split_6[2]  # h.6.attn (GPT2Attention)
        unflatten_18 = getitem_30.unflatten(-1, (12, -1))  # h.6.attn (GPT2Attention)
        transpose_30 = unflatten_18.transpose(1, 2)  # h.6.attn (GPT2Attention)
        unflatten_19 = getitem_31.unflatten(-1, (12, -1))  # h.6.attn (GPT2Attention)
        transpose_31 = unflatten_19.transpose(1, 2)  # h.6.attn (GPT2Attention)
        unflatten_20 = getitem_32.unflatten(-1, (12, -1))  # h.6.attn (GPT2Attention)
        transpose_32 = unflatten_20.transpose(1, 2)  # h.6.attn (GPT2Attention)
        size_7 = h_6_ln_1.size(1)  # h.6.attn (GPT2Attention)
        getattr_8 = h_6_ln_1.device  # h.6.attn (GPT2Attention)
        arange_7 = torch.arange(size_7, device=getattr_8)  # h.6.attn (GPT2Attention)
        getitem_33 = arange_7[None, :]  # h.6.attn (GPT2Attention)
        getitem_34 = arange_7[:, None]  # h.6.attn (GPT2Attention)
        gt_6 = getitem_33 > getitem_34  # h.6.attn (GPT2Attention)
        transpose_33 = transpose_31.transpose(-2, -1)  # h.6.attn (GPT2Attention)
        matmul_12 = transpose_30 @ transpose_33  # h.6.attn (GPT2Attention)
        mul_6 = matmul_12 * 0.125  # h.6.attn (GPT2Attention)
        masked_fill_6 = mul_6.masked_fill(gt_6, float("-inf"))  # h.6.attn (GPT2Attention)
        softmax_6 = masked_fill_6.softmax(dim=-1)  # h.6.attn (GPT2Attention)
        h_6_attn_attn_dropout = self.h["6"].attn.attn_dropout(softmax_6)  # h.6.attn.attn_dropout
        matmul_13 = h_6_attn_attn_dropout @ transpose_32  # h.6.attn (GPT2Attention)
        transpose_34 = matmul_13.transpose(1, 2)  # h.6.attn (GPT2Attention)
        flatten_6 = transpose_34.flatten(2)  # h.6.attn (GPT2Attention)
        h_6_attn_c_proj = self.h["6"].attn.c_proj(flatten_6)  # h.6.attn.c_proj
        h_6_attn_resid_dropout = self.h["6"].attn.resid_dropout(
            h_6_attn_c_proj
        )  # h.6.attn.resid_dropout
        add_13 = add_12 + h_6_attn_resid_dropout  # h.6 (GPT2Block)
        h_6_ln_2 = self.h["6"].ln_2(add_13)  # h.6.ln_2
        h_6_mlp_c_fc = self.h["6"].mlp.c_fc(h_6_ln_2)  # h.6.mlp.c_fc
        h_6_mlp_act = self.h["6"].mlp.act(h_6_mlp_c_fc)  # h.6.mlp.act
        h_6_mlp_c_proj = self.h["6"].mlp.c_proj(h_6_mlp_act)  # h.6.mlp.c_proj
        h_6_mlp_dropout = self.h["6"].mlp.dropout(h_6_mlp_c_proj)  # h.6.mlp.dropout
        add_14 = add_13 + h_6_mlp_dropout  # h.6 (GPT2Block)
        h_7_ln_1 = self.h["7"].ln_1(add_14)  # h.7.ln_1
        h_7_attn_c_attn = self.h["7"].attn.c_attn(h_7_ln_1)  # h.7.attn.c_attn
        split_7 = h_7_attn_c_attn.split(768, dim=-1)  # h.7.attn (GPT2Attention)
        getitem_35 = split_7[0]  # h.7.attn (GPT2Attention)
        getitem_36 = split_7[1]  # h.7.attn (GPT2Attention)
        getitem_37 = split_7[2]  # h.7.attn (GPT2Attention)
        unflatten_21 = getitem_35.unflatten(-1, (12, -1))  # h.7.attn (GPT2Attention)
        transpose_35 = unflatten_21.transpose(1, 2)  # h.7.attn (GPT2Attention)
        unflatten_22 = getitem_36.unflatten(-1, (12, -1))  # h.7.attn (GPT2Attention)
        transpose_36 = unflatten_22.transpose(1, 2)  # h.7.attn (GPT2Attention)
        unflatten_23 = getitem_37.unflatten(-1, (12, -1))  # h.7.attn (GPT2Attention)
        transpose_37 = unflatten_23.transpose(1, 2)  # h.7.attn (GPT2Attention)
        size_8 = h_7_ln_1.size(1)  # h.7.attn (GPT2Attention)
        getattr_9 = h_7_ln_1.device  # h.7.attn (GPT2Attention)
        arange_8 = torch.arange(size_8, device=getattr_9)  # h.7.attn (GPT2Attention)
        getitem_38 = arange_8[None, :]  # h.7.attn (GPT2Attention)
        getitem_39 = arange_8[:, None]  # h.7.attn (GPT2Attention)
        gt_7 = getitem_38 > getitem_39  # h.7.attn (GPT2Attention)
        transpose_38 = transpose_36.transpose(-2, -1)  # h.7.attn (GPT2Attention)
        matmul_14 = transpose_35 @ transpose_38  # h.7.attn (GPT2Attention)
        mul_7 = matmul_14 * 0.125  # h.7.attn (GPT2Attention)
        masked_fill_7 = mul_7.masked_fill(gt_7, float("-inf"))  # h.7.attn (GPT2Attention)
        softmax_7 = masked_fill_7.softmax(dim=-1)  # h.7.attn (GPT2Attention)
        h_7_attn_attn_dropout = self.h["7"].attn.attn_dropout(softmax_7)  # h.7.attn.attn_dropout
        matmul_15 = h_7_attn_attn_dropout @ transpose_37  # h.7.attn (GPT2Attention)
        transpose_39 = matmul_15.transpose(1, 2)  # h.7.attn (GPT2Attention)
        flatten_7 = transpose_39.flatten(2)  # h.7.attn (GPT2Attention)
        h_7_attn_c_proj = self.h["7"].attn.c_proj(flatten_7)  # h.7.attn.c_proj
        h_7_attn_resid_dropout = self.h["7"].attn.resid_dropout(
            h_7_attn_c_proj
        )  # h.7.attn.resid_dropout
        add_15 = add_14 + h_7_attn_resid_dropout  # h.7 (GPT2Block)
        h_7_ln_2 = self.h["7"].ln_2(add_15)  # h.7.ln_2
        h_7_mlp_c_fc = self.h["7"].mlp.c_fc(h_7_ln_2)  # h.7.mlp.c_fc
        h_7_mlp_act = self.h["7"].mlp.act(h_7_mlp_c_fc)  # h.7.mlp.act
        h_7_mlp_c_proj = self.h["7"].mlp.c_proj(h_7_mlp_act)  # h.7.mlp.c_proj
        h_7_mlp_dropout = self.h["7"].mlp.dropout(h_7_mlp_c_proj)  # h.7.mlp.dropout
        add_16 = add_15 + h_7_mlp_dropout  # h.7 (GPT2Block)
        return (add_16,)


class Stage2(nn.Module):
    """Stage 2: from h.8.ln_1 to h.11.mlp.dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.h = nn.ModuleDict(
            {
                "8": nn.ModuleDict(
                    {
                        "ln_1": nn.LayerNorm(768),
                        "attn": nn.ModuleDict(
                            {
                                "c_attn": nn.Linear(768, 2304),
                                "attn_dropout": nn.Dropout(p=0.1),
                                "c_proj": nn.Linear(768, 768),
                                "resid_dropout": nn.Dropout(p=0.1),
                            }
                        ),
                        "ln_2": nn.LayerNorm(768),
                        "mlp": nn.ModuleDict(
                            {
                                "c_fc": nn.Linear(768, 3072),
                                "act": nn.GELU(approximate="tanh"),
                                "c_proj": nn.Linear(3072, 768),
                                "dropout": nn.Dropout(p=0.1),
                            }
                        ),
                    }
                ),
                "9": nn.ModuleDict(
                    {
                        "ln_1": nn.LayerNorm(768),
                        "attn": nn.ModuleDict(
                            {
                                "c_attn": nn.Linear(768, 2304),
                                "attn_dropout": nn.Dropout(p=0.1),
                                "c_proj": nn.Linear(768, 768),
                                "resid_dropout": nn.Dropout(p=0.1),
                            }
                        ),
                        "ln_2": nn.LayerNorm(768),
                        "mlp": nn.ModuleDict(
                            {
                                "c_fc": nn.Linear(768, 3072),
                                "act": nn.GELU(approximate="tanh"),
                                "c_proj": nn.Linear(3072, 768),
                                "dropout": nn.Dropout(p=0.1),
                            }
                        ),
                    }
                ),
                "10": nn.ModuleDict(
                    {
                        "ln_1": nn.LayerNorm(768),
                        "attn": nn.ModuleDict(
                            {
                                "c_attn": nn.Linear(768, 2304),
                                "attn_dropout": nn.Dropout(p=0.1),
                                "c_proj": nn.Linear(768, 768),
                                "resid_dropout": nn.Dropout(p=0.1),
                            }
                        ),
                        "ln_2": nn.LayerNorm(768),
                        "mlp": nn.ModuleDict(
                            {
                                "c_fc": nn.Linear(768, 3072),
                                "act": nn.GELU(approximate="tanh"),
                                "c_proj": nn.Linear(3072, 768),
                                "dropout": nn.Dropout(p=0.1),
                            }
                        ),
                    }
                ),
                "11": nn.ModuleDict(
                    {
                        "ln_1": nn.LayerNorm(768),
                        "attn": nn.ModuleDict(
                            {
                                "c_attn": nn.Linear(768, 2304),
                                "attn_dropout": nn.Dropout(p=0.1),
                                "c_proj": nn.Linear(768, 768),
                                "resid_dropout": nn.Dropout(p=0.1),
                            }
                        ),
                        "ln_2": nn.LayerNorm(768),
                        "mlp": nn.ModuleDict(
                            {
                                "c_fc": nn.Linear(768, 3072),
                                "act": nn.GELU(approximate="tanh"),
                                "c_proj": nn.Linear(3072, 768),
                                "dropout": nn.Dropout(p=0.1),
                            }
                        ),
                    }
                ),
            }
        )

    def forward(self, add_16) -> tuple:
        h_8_ln_1 = self.h["8"].ln_1(add_16)  # h.8.ln_1
        h_8_attn_c_attn = self.h["8"].attn.c_attn(h_8_ln_1)  # h.8.attn.c_attn
        split_8 = h_8_attn_c_attn.split(768, dim=-1)  # h.8.attn (GPT2Attention)
        getitem_40 = split_8[0]  # h.8.attn (GPT2Attention)
        getitem_41 = split_8[1]  # h.8.attn (GPT2Attention)
        getitem_42 = split_8[2]  # h.8.attn (GPT2Attention)
        unflatten_24 = getitem_40.unflatten(-1, (12, -1))  # h.8.attn (GPT2Attention)
        transpose_40 = unflatten_24.transpose(1, 2)  # h.8.attn (GPT2Attention)
        unflatten_25 = getitem_41.unflatten(-1, (12, -1))  # h.8.attn (GPT2Attention)
        transpose_41 = unflatten_25.transpose(1, 2)  # h.8.attn (GPT2Attention)
        unflatten_26 = getitem_42.unflatten(-1, (12, -1))  # h.8.attn (GPT2Attention)
        transpose_42 = unflatten_26.transpose(1, 2)  # h.8.attn (GPT2Attention)
        size_9 = h_8_ln_1.size(1)  # h.8.attn (GPT2Attention)
        getattr_10 = h_8_ln_1.device  # h.8.attn (GPT2Attention)
        arange_9 = torch.arange(size_9, device=getattr_10)  # h.8.attn (GPT2Attention)
        getitem_43 = arange_9[None, :]  # h.8.attn (GPT2Attention)
        getitem_44 = arange_9[:, None]  # h.8.attn (GPT2Attention)
        gt_8 = getitem_43 > getitem_44  # h.8.attn (GPT2Attention)
        transpose_43 = transpose_41.transpose(-2, -1)  # h.8.attn (GPT2Attention)
        matmul_16 = transpose_40 @ transpose_43  # h.8.attn (GPT2Attention)
        mul_8 = matmul_16 * 0.125  # h.8.attn (GPT2Attention)
        masked_fill_8 = mul_8.masked_fill(gt_8, float("-inf"))  # h.8.attn (GPT2Attention)
        softmax_8 = masked_fill_8.softmax(dim=-1)  # h.8.attn (GPT2Attention)
        h_8_attn_attn_dropout = self.h["8"].attn.attn_dropout(softmax_8)  # h.8.attn.attn_dropout
        matmul_17 = h_8_attn_attn_dropout @ transpose_42  # h.8.attn (GPT2Attention)
        transpose_44 = matmul_17.transpose(1, 2)  # h.8.attn (GPT2Attention)
        flatten_8 = transpose_44.flatten(2)  # h.8.attn (GPT2Attention)
        h_8_attn_c_proj = self.h["8"].attn.c_proj(flatten_8)  # h.8.attn.c_proj
        h_8_attn_resid_dropout = self.h["8"].attn.resid_dropout(
            h_8_attn_c_proj
        )  # h.8.attn.resid_dropout
        add_17 = add_16 + h_8_attn_resid_dropout  # h.8 (GPT2Block)
        h_8_ln_2 = self.h["8"].ln_2(add_17)  # h.8.ln_2
        h_8_mlp_c_fc = self.h["8"].mlp.c_fc(h_8_ln_2)  # h.8.mlp.c_fc
        h_8_mlp_act = self.h["8"].mlp.act(h_8_mlp_c_fc)  # h.8.mlp.act
        h_8_mlp_c_proj = self.h["8"].mlp.c_proj(h_8_mlp_act)  # h.8.mlp.c_proj
        h_8_mlp_dropout = self.h["8"].mlp.dropout(h_8_mlp_c_proj)  # h.8.mlp.dropout
        add_18 = add_17 + h_8_mlp_dropout  # h.8 (GPT2Block)
        h_9_ln_1 = self.h["9"].ln_1(add_18)  # h.9.ln_1
        h_9_attn_c_attn = self.h["9"].attn.c_attn(h_9_ln_1)  # h.9.attn.c_attn
        split_9 = h_9_attn_c_attn.split(768, dim=-1)  # h.9.attn (GPT2Attention)
        getitem_45 = split_9[0]  # h.9.attn (GPT2Attention)
        getitem_46 = split_9[1]  # h.9.attn (GPT2Attention)
        getitem_47 = split_9[2]  # h.9.attn (GPT2Attention)
        unflatten_27 = getitem_45.unflatten(-1, (12, -1))  # h.9.attn (GPT2Attention)
        transpose_45 = unflatten_27.transpose(1, 2)  # h.9.attn (GPT2Attention)
        unflatten_28 = getitem_46.unflatten(-1, (12, -1))  # h.9.attn (GPT2Attention)
        transpose_46 = unflatten_28.transpose(1, 2)  # h.9.attn (GPT2Attention)
        unflatten_29 = getitem_47.unflatten(-1, (12, -1))  # h.9.attn (GPT2Attention)
        transpose_47 = unflatten_29.transpose(1, 2)  # h.9.attn (GPT2Attention)
        size_10 = h_9_ln_1.size(1)  # h.9.attn (GPT2Attention)
        getattr_11 = h_9_ln_1.device  # h.9.attn (GPT2Attention)
        arange_10 = torch.arange(size_10, device=getattr_11)  # h.9.attn (GPT2Attention)
        getitem_48 = arange_10[None, :]  # h.9.attn (GPT2Attention)
        getitem_49 = arange_10[:, None]  # h.9.attn (GPT2Attention)
        gt_9 = getitem_48 > getitem_49  # h.9.attn (GPT2Attention)
        transpose_48 = transpose_46.transpose(-2, -1)  # h.9.attn (GPT2Attention)
        matmul_18 = transpose_45 @ transpose_48  # h.9.attn (GPT2Attention)
        mul_9 = matmul_18 * 0.125  # h.9.attn (GPT2Attention)
        masked_fill_9 = mul_9.masked_fill(gt_9, float("-inf"))  # h.9.attn (GPT2Attention)
        softmax_9 = masked_fill_9.softmax(dim=-1)  # h.9.attn (GPT2Attention)
        h_9_attn_attn_dropout = self.h["9"].attn.attn_dropout(softmax_9)  # h.9.attn.attn_dropout
        matmul_19 = h_9_attn_attn_dropout @ transpose_47  # h.9.attn (GPT2Attention)
        transpose_49 = matmul_19.transpose(1, 2)  # h.9.attn (GPT2Attention)
        flatten_9 = transpose_49.flatten(2)  # h.9.attn (GPT2Attention)
        h_9_attn_c_proj = self.h["9"].attn.c_proj(flatten_9)  # h.9.attn.c_proj
        h_9_attn_resid_dropout = self.h["9"].attn.resid_dropout(
            h_9_attn_c_proj
        )  # h.9.attn.resid_dropout
        add_19 = add_18 + h_9_attn_resid_dropout  # h.9 (GPT2Block)
        h_9_ln_2 = self.h["9"].ln_2(add_19)  # h.9.ln_2
        h_9_mlp_c_fc = self.h["9"].mlp.c_fc(h_9_ln_2)  # h.9.mlp.c_fc
        h_9_mlp_act = self.h["9"].mlp.act(h_9_mlp_c_fc)  # h.9.mlp.act
        h_9_mlp_c_proj = self.h["9"].mlp.c_proj(h_9_mlp_act)  # h.9.mlp.c_proj
        h_9_mlp_dropout = self.h["9"].mlp.dropout(h_9_mlp_c_proj)  # h.9.mlp.dropout
        add_20 = add_19 + h_9_mlp_dropout  # h.9 (GPT2Block)
        h_10_ln_1 = self.h["10"].ln_1(add_20)  # h.10.ln_1
        h_10_attn_c_attn = self.h["10"].attn.c_attn(h_10_ln_1)  # h.10.attn.c_attn
        split_10 = h_10_attn_c_attn.split(768, dim=-1)  # h.10.attn (GPT2Attention)
        getitem_50 = split_10[0]  # h.10.attn (GPT2Attention)
        getitem_51 = split_10[1]  # h.10.attn (GPT2Attention)
        getitem_52 = split_10[2]  # h.10.attn (GPT2Attention)
        unflatten_30 = getitem_50.unflatten(-1, (12, -1))  # h.10.attn (GPT2Attention)
        transpose_50 = unflatten_30.transpose(1, 2)  # h.10.attn (GPT2Attention)
        unflatten_31 = getitem_51.unflatten(-1, (12, -1))  # h.10.attn (GPT2Attention)
        transpose_51 = unflatten_31.transpose(1, 2)  # h.10.attn (GPT2Attention)
        unflatten_32 = getitem_52.unflatten(-1, (12, -1))  # h.10.attn (GPT2Attention)
        transpose_52 = unflatten_32.transpose(1, 2)  # h.10.attn (GPT2Attention)
        size_11 = h_10_ln_1.size(1)  # h.10.attn (GPT2Attention)
        getattr_12 = h_10_ln_1.device  # h.10.attn (GPT2Attention)
        arange_11 = torch.arange(size_11, device=getattr_12)  # h.10.attn (GPT2Attention)
        getitem_53 = arange_11[None, :]  # h.10.attn (GPT2Attention)
        getitem_54 = arange_11[:, None]  # h.10.attn (GPT2Attention)
        gt_10 = getitem_53 > getitem_54  # h.10.attn (GPT2Attention)
        transpose_53 = transpose_51.transpose(-2, -1)  # h.10.attn (GPT2Attention)
        matmul_20 = transpose_50 @ transpose_53  # h.10.attn (GPT2Attention)
        mul_10 = matmul_20 * 0.125  # h.10.attn (GPT2Attention)
        masked_fill_10 = mul_10.masked_fill(gt_10, float("-inf"))  # h.10.attn (GPT2Attention)
        softmax_10 = masked_fill_10.softmax(dim=-1)  # h.10.attn (GPT2Attention)
        h_10_attn_attn_dropout = self.h["10"].attn.attn_dropout(
            softmax_10
        )  # h.10.attn.attn_dropout
        matmul_21 = h_10_attn_attn_dropout @ transpose_52  # h.10.attn (GPT2Attention)
        transpose_54 = matmul_21.transpose(1, 2)  # h.10.attn (GPT2Attention)
        flatten_10 = transpose_54.flatten(2)  # h.10.attn (GPT2Attention)
        h_10_attn_c_proj = self.h["10"].attn.c_proj(flatten_10)  # h.10.attn.c_proj
        h_10_attn_resid_dropout = self.h["10"].attn.resid_dropout(
            h_10_attn_c_proj
        )  # h.10.attn.resid_dropout
        add_21 = add_20 + h_10_attn_resid_dropout  # h.10 (GPT2Block)
        h_10_ln_2 = self.h["10"].ln_2(add_21)  # h.10.ln_2
        h_10_mlp_c_fc = self.h["10"].mlp.c_fc(h_10_ln_2)  # h.10.mlp.c_fc
        h_10_mlp_act = self.h["10"].mlp.act(h_10_mlp_c_fc)  # h.10.mlp.act
        h_10_mlp_c_proj = self.h["10"].mlp.c_proj(h_10_mlp_act)  # h.10.mlp.c_proj
        h_10_mlp_dropout = self.h["10"].mlp.dropout(h_10_mlp_c_proj)  # h.10.mlp.dropout
        add_22 = add_21 + h_10_mlp_dropout  # h.10 (GPT2Block)
        h_11_ln_1 = self.h["11"].ln_1(add_22)  # h.11.ln_1
        h_11_attn_c_attn = self.h["11"].attn.c_attn(h_11_ln_1)  # h.11.attn.c_attn
        split_11 = h_11_attn_c_attn.split(768, dim=-1)  # h.11.attn (GPT2Attention)
        getitem_55 = split_11[0]  # h.11.attn (GPT2Attention)
        getitem_56 = split_11[1]  # h.11.attn (GPT2Attention)
        getitem_57 = split_11[2]  # h.11.attn (GPT2Attention)
        unflatten_33 = getitem_55.unflatten(-1, (12, -1))  # h.11.attn (GPT2Attention)
        transpose_55 = unflatten_33.transpose(1, 2)  # h.11.attn (GPT2Attention)
        unflatten_34 = getitem_56.unflatten(-1, (12, -1))  # h.11.attn (GPT2Attention)
        transpose_56 = unflatten_34.transpose(1, 2)  # h.11.attn (GPT2Attention)
        unflatten_35 = getitem_57.unflatten(-1, (12, -1))  # h.11.attn (GPT2Attention)
        transpose_57 = unflatten_35.transpose(1, 2)  # h.11.attn (GPT2Attention)
        size_12 = h_11_ln_1.size(1)  # h.11.attn (GPT2Attention)
        getattr_13 = h_11_ln_1.device  # h.11.attn (GPT2Attention)
        arange_12 = torch.arange(size_12, device=getattr_13)  # h.11.attn (GPT2Attention)
        getitem_58 = arange_12[None, :]  # h.11.attn (GPT2Attention)
        getitem_59 = arange_12[:, None]  # h.11.attn (GPT2Attention)
        gt_11 = getitem_58 > getitem_59  # h.11.attn (GPT2Attention)
        transpose_58 = transpose_56.transpose(-2, -1)  # h.11.attn (GPT2Attention)
        matmul_22 = transpose_55 @ transpose_58  # h.11.attn (GPT2Attention)
        mul_11 = matmul_22 * 0.125  # h.11.attn (GPT2Attention)
        masked_fill_11 = mul_11.masked_fill(gt_11, float("-inf"))  # h.11.attn (GPT2Attention)
        softmax_11 = masked_fill_11.softmax(dim=-1)  # h.11.attn (GPT2Attention)
        h_11_attn_attn_dropout = self.h["11"].attn.attn_dropout(
            softmax_11
        )  # h.11.attn.attn_dropout
        matmul_23 = h_11_attn_attn_dropout @ transpose_57  # h.11.attn (GPT2Attention)
        transpose_59 = matmul_23.transpose(1, 2)  # h.11.attn (GPT2Attention)
        flatten_11 = transpose_59.flatten(2)  # h.11.attn (GPT2Attention)
        h_11_attn_c_proj = self.h["11"].attn.c_proj(flatten_11)  # h.11.attn.c_proj
        h_11_attn_resid_dropout = self.h["11"].attn.resid_dropout(
            h_11_attn_c_proj
        )  # h.11.attn.resid_dropout
        add_23 = add_22 + h_11_attn_resid_dropout  # h.11 (GPT2Block)
        h_11_ln_2 = self.h["11"].ln_2(add_23)  # h.11.ln_2
        h_11_mlp_c_fc = self.h["11"].mlp.c_fc(h_11_ln_2)  # h.11.mlp.c_fc
        h_11_mlp_act = self.h["11"].mlp.act(h_11_mlp_c_fc)  # h.11.mlp.act
        h_11_mlp_c_proj = self.h["11"].mlp.c_proj(h_11_mlp_act)  # h.11.mlp.c_proj
        h_11_mlp_dropout = self.h["11"].mlp.dropout(h_11_mlp_c_proj)  # h.11.mlp.dropout
        add_24 = add_23 + h_11_mlp_dropout  # h.11 (GPT2Block)
        return (add_24,)


class Stage3(nn.Module):
    """Stage 3: from ln_f to lm_head."""

    def __init__(self) -> None:
        super().__init__()
        self.ln_f = nn.LayerNorm(768)
        self.lm_head = nn.Linear(768, 50257, bias=False)

    def forward(self, add_24) -> tuple:
        ln_f = self.ln_f(add_24)  # ln_f
        lm_head = self.lm_head(ln_f)  # lm_head
        return (lm_head,)


PIPELINE = {
    "model": "gpt2_s512",
    "method": "acyclic",
    "batch_size": 8,
    "source": {"family": "nlp", "model": "gpt2"},
    "model_inputs": ["input_ids"],
    "model_outputs": ["lm_head"],
    "batch_dim": 0,
    "n_stages": 4,
    "stages": [
        {
            "inputs": ["input_ids"],
            "outputs": ["add_8"],
            "values": {
                "input_ids": {
                    "shape": [8, 512],
                    "dtype": "int64",
                    "requires_grad": False,
                    "batch_dim": 0,
                    "producer": None,
                    "consumers": [0],
                },
                "add_8": {
                    "shape": [8, 512, 768],
                    "dtype": "float32",
                    "requires_grad": True,
                    "batch_dim": 0,
                    "producer": 0,
                    "consumers": [1],
                },
            },
            "parameters": [
                "wte.weight",
                "wpe.weight",
                "h.0.ln_1.weight",
                "h.0.ln_1.bias",
                "h.0.attn.c_attn.weight",
                "h.0.attn.c_attn.bias",
                "h.0.attn.c_proj.weight",
                "h.0.attn.c_proj.bias",
                "h.0.ln_2.weight",
                "h.0.ln_2.bias",
                "h.0.mlp.c_fc.weight",
                "h.0.mlp.c_fc.bias",
                "h.0.mlp.c_proj.weight",
                "h.0.mlp.c_proj.bias",
                "h.1.ln_1.weight",
                "h.1.ln_1.bias",
                "h.1.attn.c_attn.weight",
                "h.1.attn.c_attn.bias",
                "h.1.attn.c_proj.weight",
                "h.1.attn.c_proj.bias",
                "h.1.ln_2.weight",
                "h.1.ln_2.bias",
                "h.1.mlp.c_fc.weight",
                "h.1.mlp.c_fc.bias",
                "h.1.mlp.c_proj.weight",
                "h.1.mlp.c_proj.bias",
                "h.2.ln_1.weight",
                "h.2.ln_1.bias",
                "h.2.attn.c_attn.weight",
                "h.2.attn.c_attn.bias",
                "h.2.attn.c_proj.weight",
                "h.2.attn.c_proj.bias",
                "h.2.ln_2.weight",
                "h.2.ln_2.bias",
                "h.2.mlp.c_fc.weight",
                "h.2.mlp.c_fc.bias",
                "h.2.mlp.c_proj.weight",
                "h.2.mlp.c_proj.bias",
                "h.3.ln_1.weight",
                "h.3.ln_1.bias",
                "h.3.attn.c_attn.weight",
                "h.3.attn.c_attn.bias",
                "h.3.attn.c_proj.weight",
                "h.3.attn.c_proj.bias",
                "h.3.ln_2.weight",
                "h.3.ln_2.bias",
                "h.3.mlp.c_fc.weight",
                "h.3.mlp.c_fc.bias",
                "h.3.mlp.c_proj.weight",
                "h.3.mlp.c_proj.bias",
            ],
            "buffers": [],
            "replicas": 1,
            "costs": {
                "forward_ms": 21.4268,
                "backward_ms": 61.9877,
                "comm_ms": 2.0972,
                "param_bytes": 270941184,
                "send_bytes": 12582912,
                "recv_bytes": 0,
                "memory_bytes": 1577895936,
            },
        },
        {
            "inputs": ["add_8"],
            "outputs": ["add_16"],
            "values": {
                "add_8": {
                    "shape": [8, 512, 768],
                    "dtype": "float32",
                    "requires_grad": True,
                    "batch_dim": 0,
                    "producer": 0,
                    "consumers": [1],
                },
                "add_16": {
                    "shape": [8, 512, 768],
                    "dtype": "float32",
                    "requires_grad": True,
                    "batch_dim": 0,
                    "producer": 1,
                    "consumers": [2],
                },
            },
            "parameters": [
                "h.4.ln_1.weight",
                "h.4.ln_1.bias",
                "h.4.attn.c_attn.weight",
                "h.4.attn.c_attn.bias",
                "h.4.attn.c_proj.weight",
                "h.4.attn.c_proj.bias",
                "h.4.ln_2.weight",
                "h.4.ln_2.bias",
                "h.4.mlp.c_fc.weight",
                "h.4.mlp.c_fc.bias",
                "h.4.mlp.c_proj.weight",
                "h.4.mlp.c_proj.bias",
                "h.5.ln_1.weight",
                "h.5.ln_1.bias",
                "h.5.attn.c_attn.weight",
                "h.5.attn.c_attn.bias",
                "h.5.attn.c_proj.weight",
                "h.5.attn.c_proj.bias",
                "h.5.ln_2.weight",
                "h.5.ln_2.bias",
                "h.5.mlp.c_fc.weight",
                "h.5.mlp.c_fc.bias",
                "h.5.mlp.c_proj.weight",
                "h.5.mlp.c_proj.bias",
                "h.6.ln_1.weight",
                "h.6.ln_1.bias",
                "h.6.attn.c_attn.weight",
                "h.6.attn.c_attn.bias",
                "h.6.attn.c_proj.weight",
                "h.6.attn.c_proj.bias",
                "h.6.ln_2.weight",
                "h.6.ln_2.bias",
                "h.6.mlp.c_fc.weight",
                "h.6.mlp.c_fc.bias",
                "h.6.mlp.c_proj.weight",
                "h.6.mlp.c_proj.bias",
                "h.7.ln_1.weight",
                "h.7.ln_1.bias",
                "h.7.attn.c_attn.weight",
                "h.7.attn.c_attn.bias",
                "h.7.attn.c_proj.weight",
                "h.7.attn.c_proj.bias",
                "h.7.ln_2.weight",
                "h.7.ln_2.bias",
                "h.7.mlp.c_fc.weight",
                "h.7.mlp.c_fc.bias",
                "h.7.mlp.c_proj.weight",
                "h.7.mlp.c_proj.bias",
            ],
            "buffers": [],
            "replicas": 1,
            "costs": {
                "forward_ms": 21.3376,
                "backward_ms": 61.6046,
                "comm_ms": 2.0972,
                "param_bytes": 113405952,
                "send_bytes": 12582912,
                "recv_bytes": 12582912,
                "memory_bytes": 1104896000,
            },
        },
        {
            "inputs": ["add_16"],
            "outputs": ["add_24"],
            "values": {
                "add_16": {
                    "shape": [8, 512, 768],
                    "dtype": "float32",
                    "requires_grad": True,
                    "batch_dim": 0,
                    "producer": 1,
                    "consumers": [2],
                },
                "add_24": {
                    "shape": [8, 512, 768],
                    "dtype": "float32",
                    "requires_grad": True,
                    "batch_dim": 0,
                    "producer": 2,
                    "consumers": [3],
                },
            },
            "parameters": [
                "h.8.ln_1.weight",
                "h.8.ln_1.bias",
                "h.8.attn.c_attn.weight",
                "h.8.attn.c_attn.bias",
                "h.8.attn.c_proj.weight",
                "h.8.attn.c_proj.bias",
                "h.8.ln_2.weight",
                "h.8.ln_2.bias",
                "h.8.mlp.c_fc.weight",
                "h.8.mlp.c_fc.bias",
                "h.8.mlp.c_proj.weight",
                "h.8.mlp.c_proj.bias",
                "h.9.ln_1.weight",
                "h.9.ln_1.bias",
                "h.9.attn.c_attn.weight",
                "h.9.attn.c_attn.bias",
                "h.9.attn.c_proj.weight",
                "h.9.attn.c_proj.bias",
                "h.9.ln_2.weight",
                "h.9.ln_2.bias",
                "h.9.mlp.c_fc.weight",
                "h.9.mlp.c_fc.bias",
                "h.9.mlp.c_proj.weight",
                "h.9.mlp.c_proj.bias",
                "h.10.ln_1.weight",
                "h.10.ln_1.bias",
                "h.10.attn.c_attn.weight",
                "h.10.attn.c_attn.bias",
                "h.10.attn.c_proj.weight",
                "h.10.attn.c_proj.bias",
                "h.10.ln_2.weight",
                "h.10.ln_2.bias",
                "h.10.mlp.c_fc.weight",
                "h.10.mlp.c_fc.bias",
                "h.10.mlp.c_proj.weight",
                "h.10.mlp.c_proj.bias",
                "h.11.ln_1.weight",
                "h.11.ln_1.bias",
                "h.11.attn.c_attn.weight",
                "h.11.attn.c_attn.bias",
                "h.11.attn.c_proj.weight",
                "h.11.attn.c_proj.bias",
                "h.11.ln_2.weight",
                "h.11.ln_2.bias",
                "h.11.mlp.c_fc.weight",
                "h.11.mlp.c_fc.bias",
                "h.11.mlp.c_proj.weight",
                "h.11.mlp.c_proj.bias",
            ],
            "buffers": [],
            "replicas": 1,
            "costs": {
                "forward_ms": 21.3376,
                "backward_ms": 61.6046,
                "comm_ms": 2.0972,
                "param_bytes": 113405952,
                "send_bytes": 12582912,
                "recv_bytes": 12582912,
                "memory_bytes": 1101750272,
            },
        },
        {
            "inputs": ["add_24"],
            "outputs": ["lm_head"],
            "values": {
                "add_24": {
                    "shape": [8, 512, 768],
                    "dtype": "float32",
                    "requires_grad": True,
                    "batch_dim": 0,
                    "producer": 2,
                    "consumers": [3],
                },
                "lm_head": {
                    "shape": [8, 512, 50257],
                    "dtype": "float32",
                    "requires_grad": True,
                    "batch_dim": 0,
                    "producer": 3,
                    "consumers": [],
                },
            },
            "parameters": ["ln_f.weight", "ln_f.bias", "lm_head.weight"],
            "buffers": [],
            "replicas": 1,
            "costs": {
                "forward_ms": 20.1674,
                "backward_ms": 60.4883,
                "comm_ms": 0.0,
                "param_bytes": 154395648,
                "send_bytes": 0,
                "recv_bytes": 12582912,
                "memory_bytes": 675331072,
            },
        },
    ],
    "tied_parameters": [[[0, "wte.weight"], [3, "lm_head.weight"]]],
    "state_keys": [
        "wte.weight",
        "wpe.weight",
        "h.0.ln_1.weight",
        "h.0.ln_1.bias",
        "h.0.attn.c_attn.weight",
        "h.0.attn.c_attn.bias",
        "h.0.attn.c_proj.weight",
        "h.0.attn.c_proj.bias",
        "h.0.ln_2.weight",
        "h.0.ln_2.bias",
        "h.0.mlp.c_fc.weight",
        "h.0.mlp.c_fc.bias",
        "h.0.mlp.c_proj.weight",
        "h.0.mlp.c_proj.bias",
        "h.1.ln_1.weight",
        "h.1.ln_1.bias",
        "h.1.attn.c_attn.weight",
        "h.1.attn.c_attn.bias",
        "h.1.attn.c_proj.weight",
        "h.1.attn.c_proj.bias",
        "h.1.ln_2.weight",
        "h.1.ln_2.bias",
        "h.1.mlp.c_fc.weight",
        "h.1.mlp.c_fc.bias",
        "h.1.mlp.c_proj.weight",
        "h.1.mlp.c_proj.bias",
        "h.2.ln_1.weight",
        "h.2.ln_1.bias",
        "h.2.attn.c_attn.weight",
        "h.2.attn.c_attn.bias",
        "h.2.attn.c_proj.weight",
        "h.2.attn.c_proj.bias",
        "h.2.ln_2.weight",
        "h.2.ln_2.bias",
        "h.2.mlp.c_fc.weight",
        "h.2.mlp.c_fc.bias",
        "h.2.mlp.c_proj.weight",
        "h.2.mlp.c_proj.bias",
        "h.3.ln_1.weight",
        "h.3.ln_1.bias",
        "h.3.attn.c_attn.weight",
        "h.3.attn.c_attn.bias",
        "h.3.attn.c_proj.weight",
        "h.3.attn.c_proj.bias",
        "h.3.ln_2.weight",
        "h.3.ln_2.bias",
        "h.3.mlp.c_fc.weight",
        "h.3.mlp.c_fc.bias",
        "h.3.mlp.c_proj.weight",
        "h.3.mlp.c_proj.bias",
        "h.4.ln_1.weight",
        "h.4.ln_1.bias",
        "h.4.attn.c_attn.weight",
        "h.4.attn.c_attn.bias",
        "h.4.attn.c_proj.weight",
        "h.4.attn.c_proj.bias",
        "h.4.ln_2.weight",
        "h.4.ln_2.bias",
        "h.4.mlp.c_fc.weight",
        "h.4.mlp.c_fc.bias",
        "h.4.mlp.c_proj.weight",
        "h.4.mlp.c_proj.bias",
        "h.5.ln_1.weight",
        "h.5.ln_1.bias",
        "h.5.attn.c_attn.weight",
        "h.5.attn.c_attn.bias",
        "h.5.attn.c_proj.weight",
        "h.5.attn.c_proj.bias",
        "h.5.ln_2.weight",
        "h.5.ln_2.bias",
        "h.5.mlp.c_fc.weight",
        "h.5.mlp.c_fc.bias",
        "h.5.mlp.c_proj.weight",
        "h.5.mlp.c_proj.bias",
        "h.6.ln_1.weight",
        "h.6.ln_1.bias",
        "h.6.attn.c_attn.weight",
        "h.6.attn.c_attn.bias",
        "h.6.attn.c_proj.weight",
        "h.6.attn.c_proj.bias",
        "h.6.ln_2.weight",
        "h.6.ln_2.bias",
        "h.6.mlp.c_fc.weight",
        "h.6.mlp.c_fc.bias",
        "h.6.mlp.c_proj.weight",
        "h.6.mlp.c_proj.bias",
        "h.7.ln_1.weight",
        "h.7.ln_1.bias",
        "h.7.attn.c_attn.weight",
        "h.7.attn.c_attn.bias",
        "h.7.attn.c_proj.weight",
        "h.7.attn.c_proj.bias",
        "h.7.ln_2.weight",
        "h.7.ln_2.bias",
        "h.7.mlp.c_fc.weight",
        "h.7.mlp.c_fc.bias",
        "h.7.mlp.c_proj.weight",
        "h.7.mlp.c_proj.bias",
        "h.8.ln_1.weight",
        "h.8.ln_1.bias",
        "h.8.attn.c_attn.weight",
        "h.8.attn.c_attn.bias",
        "h.8.attn.c_proj.weight",
        "h.8.attn.c_proj.bias",
        "h.8.ln_2.weight",
        "h.8.ln_2.bias",
        "h.8.mlp.c_fc.weight",
        "h.8.mlp.c_fc.bias",
        "h.8.mlp.c_proj.weight",
        "h.8.mlp.c_proj.bias",
        "h.9.ln_1.weight",
        "h.9.ln_1.bias",
        "h.9.attn.c_attn.weight",
        "h.9.attn.c_attn.bias",
        "h.9.attn.c_proj.weight",
        "h.9.attn.c_proj.bias",
        "h.9.ln_2.weight",
        "h.9.ln_2.bias",
        "h.9.mlp.c_fc.weight",
        "h.9.mlp.c_fc.bias",
        "h.9.mlp.c_proj.weight",
        "h.9.mlp.c_proj.bias",
        "h.10.ln_1.weight",
        "h.10.ln_1.bias",
        "h.10.attn.c_attn.weight",
        "h.10.attn.c_attn.bias",
        "h.10.attn.c_proj.weight",
        "h.10.attn.c_proj.bias",
        "h.10.ln_2.weight",
        "h.10.ln_2.bias",
        "h.10.mlp.c_fc.weight",
        "h.10.mlp.c_fc.bias",
        "h.10.mlp.c_proj.weight",
        "h.10.mlp.c_proj.bias",
        "h.11.ln_1.weight",
        "h.11.ln_1.bias",
        "h.11.attn.c_attn.weight",
        "h.11.attn.c_attn.bias",
        "h.11.attn.c_proj.weight",
        "h.11.attn.c_proj.bias",
        "h.11.ln_2.weight",
        "h.11.ln_2.bias",
        "h.11.mlp.c_fc.weight",
        "h.11.mlp.c_fc.bias",
        "h.11.mlp.c_proj.weight",
        "h.11.mlp.c_proj.bias",
        "ln_f.weight",
        "ln_f.bias",
        "lm_head.weight",
    ],
}

STAGES = [
    Stage0,
    Stage1,
    Stage2,
    Stage3,
]


def build_stage(index: int, state_dict: dict | None = None) -> nn.Module:
    """Build stage ``index``; with the original model's ``state_dict``, load its weights."""
    stage = STAGES[index]()
    if state_dict is not None:
        own = stage.state_dict()
        missing = [key for key in own if key not in state_dict]
        if missing:
            raise KeyError(f"the state dict has no {missing[0]!r}, which stage {index} needs")
        stage.load_state_dict({key: state_dict[key] for key in own})
    return stage


def build_stages(state_dict: dict | None = None) -> list:
    """Build every stage, loading the original model's ``state_dict`` when given."""
    return [build_stage(index, state_dict) for index in range(len(STAGES))]


def merge_state_dicts(stage_state_dicts: list) -> dict:
    """One state dict with the original model's keys, in its order, from the stages' ones."""
    merged = {}
    for state_dict in stage_state_dicts:
        merged.update(state_dict)
    return {key: merged[key] for key in PIPELINE["state_keys"] if key in merged}
