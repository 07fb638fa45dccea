"""Tiny random-init models for the real-model suite (no downloads): each entry builds
``(model, make_inputs(batch, seq), loss_fn(output, inputs))``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 64
# A Llama decoder layer's linears, by their paths within the layer (``llama()`` has two layers)
LLAMA_PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
LLAMA_LINEARS = tuple(f"model.layers.{i}.{name}" for i in range(2) for name in LLAMA_PROJECTIONS)


def _ids(batch, seq):
    return {"input_ids": torch.randint(0, VOCAB, (batch, seq))}


def _lm_loss(out, inputs):
    logits = out.logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), inputs["input_ids"][:, 1:].reshape(-1))


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="sdpa",
        use_cache=False,
    )
    return LlamaForCausalLM(cfg), _ids, _lm_loss


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        attn_implementation="sdpa",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg), _ids, _lm_loss


def bert():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )

    def loss(out, inputs):
        return F.cross_entropy(out.logits, inputs["input_ids"][:, 0] % 3)

    return BertForSequenceClassification(cfg), _ids, loss


def vit():
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=5,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )

    def make(batch, seq):  # "seq" picks the image side: 16 -> 16 patches, interpolated position embeddings otherwise
        g = torch.Generator().manual_seed(batch * 31 + seq)
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g), "labels": torch.arange(batch) % 5}

    def loss(out, inputs):
        return F.cross_entropy(out.logits, inputs["labels"])

    model = ViTForImageClassification(cfg)
    return model, make, loss


class Encoder(nn.Module):
    """nn.TransformerEncoder (MultiheadAttention inside) with a linear head."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.encoder(x))


def encoder():
    def make(batch, seq):
        return {"x": torch.randn(batch, seq, 32)}

    def loss(out, inputs):
        return (out - inputs["x"][..., :4]).square().mean()

    return Encoder(), make, loss


class Block(nn.Module):
    def __init__(self, c, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c // stride, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.down = (
            nn.Sequential(nn.Conv2d(c // stride, c, 1, stride, bias=False), nn.BatchNorm2d(c))
            if stride > 1
            else nn.Identity()
        )

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.down(x))


class ResNet(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layers = nn.Sequential(Block(8, 1), Block(16, 2))
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


def resnet():
    def make(batch, seq):  # "seq" is the image side
        g = torch.Generator().manual_seed(batch * 31 + seq)
        return {"x": torch.randn(batch, 3, seq, seq, generator=g), "labels": torch.arange(batch) % 5}

    def loss(out, inputs):
        return F.cross_entropy(out, inputs["labels"])

    return ResNet(), make, loss


MODELS = {"llama": llama, "gpt2": gpt2, "bert": bert, "vit": vit, "encoder": encoder, "resnet": resnet}


def call(model, inputs):
    return model(**{k: v for k, v in inputs.items() if k != "labels"})


def output_tensor(out):
    return out.logits if hasattr(out, "logits") else out
