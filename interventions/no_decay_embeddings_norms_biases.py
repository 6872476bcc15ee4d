"""AdamW without weight decay on embeddings, LayerNorm parameters and biases (the GPT-2/nanoGPT habit);
decay stays on the matrices of the attention and MLP linears and on an untied output head."""

from torch import nn

from harness.trial.plugins import Plugin, register


@register("no_decay_embeddings_norms_biases")
class NoDecayEmbeddingsNormsBiases(Plugin):
    def parameter_groups(self, model: nn.Module, groups: list[dict]) -> list[dict]:
        exempt = set()
        for module in model.modules():
            if isinstance(module, (nn.Embedding, nn.LayerNorm)):
                exempt.update(id(p) for p in module.parameters(recurse=False))
            elif isinstance(module, nn.Linear) and module.bias is not None:
                exempt.add(id(module.bias))
        split = []
        for group in groups:
            params = list(group["params"])
            split.append({**group, "params": [p for p in params if id(p) not in exempt]})
            split.append({**group, "params": [p for p in params if id(p) in exempt], "weight_decay": 0.0})
        return [g for g in split if g["params"]]
