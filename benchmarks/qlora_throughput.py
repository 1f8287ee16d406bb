"""QLoRA training throughput on a Llama-shaped model with random weights (no download).

    python -m benchmarks.qlora_throughput --layers 8 --hidden 8192 --seq-len 4096 --steps 6
    python -m benchmarks.qlora_throughput --tiny          # a seconds-long check on the CPU

Builds the model with transformers, quantizes it exactly as the trainer does (training.model:
NF4, double quantization, bf16 compute and storage), adds LoRA r=64 on every projection,
and runs forward+backward+step on random 4096-token rows with gradient checkpointing.
Prints tokens/s per GPU and peak GPU memory. Reference: published FSDP-QLoRA runs of
Llama-2-70B reach about 790 tokens/s per H100; the full 70B has 80 layers of hidden 8192,
so scale the per-layer time accordingly.
"""

from __future__ import annotations

import argparse
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=8192)
    parser.add_argument("--intermediate", type=int, default=28672)
    parser.add_argument("--heads", type=int, default=64)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer, 256-wide model on the CPU")
    args = parser.parse_args()
    if args.tiny:
        args.layers, args.hidden, args.intermediate, args.heads, args.kv_heads = 2, 256, 512, 4, 2
        args.seq_len, args.steps = 256, 3

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from training.config import config_from_dict
    from training.model import load_qlora_model

    cuda = torch.cuda.is_available()
    config = LlamaConfig(
        vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seq_len, rms_norm_eps=1e-5,
    )
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        with torch.device("cuda" if cuda else "cpu"):
            LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
        if cuda:
            torch.cuda.empty_cache()
        recipe = config_from_dict({
            "base_model": folder, "datasets": ["unused.json"],
            "train": {"seq_len": args.seq_len, "gradient_checkpointing": True},
        })
        model = load_qlora_model(recipe, device_map={"": 0} if cuda else None)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    device = next(model.parameters()).device
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.steps):
        ids = torch.randint(0, config.vocab_size, (1, args.seq_len), device=device)
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        print(f"step {step}: {times[-1]:.2f} s, loss {loss.item():.3f}")
    steady = times[1:] or times
    tps = args.seq_len / (sum(steady) / len(steady))
    name = torch.cuda.get_device_name(0) if cuda else "CPU"
    print(f"device: {name}")
    print(f"model: {args.layers} layers, hidden {args.hidden}, {args.seq_len}-token rows, QLoRA nf4 + double quant, LoRA r=64")
    print(f"tokens/s per device: {tps:.0f}")
    if (args.hidden, args.intermediate) == (8192, 28672):  # Llama-2-70B's layer shape
        print(f"a full 80-layer 70B at this per-layer speed: ≈ {tps * args.layers / 80:.0f} tokens/s per device")
    if cuda:
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
