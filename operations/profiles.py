"""The guide's models as named profiles (repo and file names only: sizes and sha256 come from the
Hugging Face API at deploy time, never from this file)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelProfile:
    repo: str
    file: str
    mmproj: str | None = None
    note: str = ""

    def as_settings(self) -> dict:
        values = {"source": "hf", "repo": self.repo, "file": self.file}
        if self.mmproj:
            values["mmproj"] = self.mmproj
        return values


PROFILES: dict[str, ModelProfile] = {
    "qwen3.5-35b-a3b-ud-q4_k_xl": ModelProfile(
        "unsloth/Qwen3.5-35B-A3B-GGUF", "Qwen3.5-35B-A3B-UD-Q4_K_XL.gguf", "mmproj-F16.gguf",
        "the guide's main model: 19 GB, 190 tok/s decode on an RTX 5090"),
    "qwen3.5-35b-a3b-mxfp4_moe": ModelProfile(
        "unsloth/Qwen3.5-35B-A3B-GGUF", "Qwen3.5-35B-A3B-MXFP4_MOE.gguf", "mmproj-F16.gguf",
        "21 GB, 167 tok/s in the guide: slower and larger than UD-Q4_K_XL"),
    "qwen3.5-27b-q4_k_m": ModelProfile(
        "unsloth/Qwen3.5-27B-GGUF", "Qwen3.5-27B-Q4_K_M.gguf", None,
        "dense, 16 GB, 66 tok/s in the guide"),
    "qwen2.5-1.5b-instruct-q8_0": ModelProfile(
        "Qwen/Qwen2.5-1.5B-Instruct-GGUF", "qwen2.5-1.5b-instruct-q8_0.gguf", None,
        "the guide's CPU translator, 1.9 GB"),
}
