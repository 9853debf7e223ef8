"""Configuration of a samoe model exported for Hugging Face transformers (remote code).

Written by samoe (`samoe export`) and copied into every exported directory; it imports only
transformers. `samoe` holds the model's samoe config (model section of config.yaml), with
`moe_layers` (block indices of the MoE FFNs) and `experts_per_layer` resolved, so that the
modelling code needs no samoe import.
"""

from transformers import PretrainedConfig


class SamoeConfig(PretrainedConfig):
    model_type = "samoe"

    def __init__(self, samoe=None, vocab_size=2048, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                 max_position_embeddings=128, tie_word_embeddings=True, use_cache=True, output_router_logits=False,
                 **kwargs):
        self.samoe = dict(samoe or {})
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.use_cache = use_cache
        self.output_router_logits = output_router_logits
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
