"""The projector types: k Whisper encoder frames -> one audio token in the LLM's embedding space.
Each is a `project` on groups of k frames; the shared part (padding to whole groups, the output
LayerNorm, the CTC blank used in training) is the base class. --projector_type picks one by name."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class Projector(nn.Module):
    """What every projector type shares: k encoder frames become one audio token (k=5 on Whisper's 50
    frames/s = 10 tokens/s), the type's layers (`project`) map it into the LLM's embedding space.
    output_norm: a LayerNorm whose gain starts at the scale of the LLM's token embeddings. Without
    it the audio embeddings grew to 67x a token embedding's norm (recipes/game_speech/audio_use.py), swamped the
    residual stream, and the LLM's layers could no longer work on them."""
    default_kernel = 5

    def __init__(self, llm_dim: int, kernel: int, output_norm: bool = True, ctc_blank: bool = False):
        super().__init__()
        self.kernel = kernel
        self.norm = nn.LayerNorm(llm_dim) if output_norm else nn.Identity()
        # training only: the CTC blank's "token embedding" (see ctc_loss); unused in decoding
        self.ctc_blank = nn.Parameter(torch.zeros(llm_dim)) if ctc_blank else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T', encoder_dim), zero beyond each utterance's valid frames, so that an utterance's
        # last, partial group of k frames is the same in a batch as alone
        x = F.pad(x, (0, 0, 0, -x.shape[1] % self.kernel))  # (B, ceil(T'/k)*k, encoder_dim)
        return self.norm(self.project(x))  # (B, ceil(T'/k), llm_dim)


class ConvProjector(Projector):
    """"conv" (the default): Conv1d(kernel=stride=k) stacks k frames into one, then a 2-layer MLP."""

    def __init__(self, encoder_dim: int, llm_dim: int, kernel: int = 5, hidden: int = 2048, **kwargs):
        super().__init__(llm_dim, kernel, **kwargs)
        self.conv = nn.Conv1d(encoder_dim, encoder_dim, kernel_size=kernel, stride=kernel)
        self.linear1 = nn.Linear(encoder_dim, hidden)
        self.linear2 = nn.Linear(hidden, llm_dim)

    def project(self, x):
        x = F.relu(self.conv(x.transpose(1, 2))).transpose(1, 2)  # (B, T'/k, encoder_dim)
        return self.linear2(F.relu(self.linear1(x)))  # (B, T'/k, llm_dim)


class AvgPoolProjector(Projector):
    """"qwen2-audio", Qwen2-Audio's: the mean of k=2 frames (25 tokens/s), then one linear layer.
    (Qwen2-Audio pools just before the encoder's final LayerNorm; here just after it.)"""
    default_kernel = 2

    def __init__(self, encoder_dim: int, llm_dim: int, kernel: int = 2, hidden: int | None = None, **kwargs):
        super().__init__(llm_dim, kernel, **kwargs)
        self.linear = nn.Linear(encoder_dim, llm_dim)  # hidden: unused, no hidden layer

    def project(self, x):
        x = F.avg_pool1d(x.transpose(1, 2), self.kernel).transpose(1, 2)  # (B, T'/k, encoder_dim)
        return self.linear(x)  # (B, T'/k, llm_dim)


class StackingProjector(Projector):
    """"linear", SLAM-ASR's: k consecutive frames concatenated into one vector, then linear -> ReLU -> linear."""

    def __init__(self, encoder_dim: int, llm_dim: int, kernel: int = 5, hidden: int = 2048, **kwargs):
        super().__init__(llm_dim, kernel, **kwargs)
        self.linear1 = nn.Linear(kernel * encoder_dim, hidden)
        self.linear2 = nn.Linear(hidden, llm_dim)

    def project(self, x):
        x = x.reshape(x.shape[0], x.shape[1] // self.kernel, self.kernel * x.shape[2])  # (B, T'/k, k*encoder_dim)
        return self.linear2(F.relu(self.linear1(x)))  # (B, T'/k, llm_dim)


PROJECTOR_TYPES = {"conv": ConvProjector, "qwen2-audio": AvgPoolProjector, "linear": StackingProjector}
