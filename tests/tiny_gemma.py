"""A tiny random Gemma-3 (4 layers, global layers 1 and 3, sliding window 16) for fast CPU
tests of the distillation and the routed evaluation; no download."""
import torch


def tiny_gemma(seed: int = 0, *, peaked: bool = True):
    import hisa.eval.attention  # noqa: F401  (registers the hisa_eval attention)
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    cfg = Gemma3TextConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
                           head_dim=32, sliding_window=16, query_pre_attn_scalar=32,
                           layer_types=["sliding_attention", "full_attention",
                                        "sliding_attention", "full_attention"],
                           max_position_embeddings=2048)
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM._from_config(cfg, attn_implementation="hisa_eval").eval()
    if peaked:   # peaked attention (Gemma's RMSNorm scales by 1 + weight): a target far from
        with torch.no_grad():                      # uniform, so learning and pruning show
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.fill_(3.0)
    return model
