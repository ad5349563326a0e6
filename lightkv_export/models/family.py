"""The model-family interface and its registry: the only code that knows a model is its family's class.

A family is one class in one module, registered with `@register_family(name, model_types=...)` (as optimum's
`TasksManager.create_register`): loading (real classes and configs, the tiny preset, processors, token ids), the
architecture's sizes (`arch`: one ArchShape, read from the config), the decoder's parts, the vision export, request
preparation (processor -> vision embeddings -> embeddings and positions, with each image's span and grid) and the
positional scheme (`positions`). Export, the pass, the runtimes, the pipeline, the targets, parity and the report
reach a model only through these methods; a family that differs only in classes or sizes subclasses another.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from lightkv_export.models.base import head_dim, scatter_vision

if TYPE_CHECKING:
    import torch

    from lightkv_export.images import ImageHost
    from lightkv_export.method.spans import VisionSpan
    from lightkv_export.models.base import LoadedModel, ModelSpec, PrefillInputs, VisionExport
    from lightkv_export.models.positions import Positions


@dataclass(frozen=True)
class ArchShape:
    """One model's sizes, as accounting and the exporter need them; built by `Family.arch` from a config.

    vision:           the planner's token rule for a model no family builds yet ("llava-next", models/shapes.py);
                      "" for every family's models (their own image side counts the tokens)
    language_params:  decoder + embeddings + LM head (tied heads counted once)
    vision_params:    vision encoder + projector / merger
    key, hf_id, default_windows, default_image_size: the registry entry it was read for (empty for a bare config)
    """

    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int  # from the config (several families' differs from hidden / heads)
    intermediate: int  # gated MLP (gate, up, down)
    vocab: int
    tie_embeddings: bool
    qkv_bias: bool
    vision: str
    language_params: int
    vision_params: int
    key: str = ""
    hf_id: str = ""
    default_windows: tuple[int, ...] = ()
    default_image_size: tuple[int, int] = (0, 0)  # (height, width) pixels of the planner's default request
    first_merge_layer: tuple[int, str] = (1, "")  # Family.first_merge_layer: the earliest stage, and why

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def params(self) -> int:
        return self.language_params + self.vision_params

    def weight_bytes(self, dtype_bytes: int) -> int:
        return self.params() * dtype_bytes

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of one token in one layer."""
        from lightkv_export.kv import kv_bytes

        return kv_bytes([1], self.kv_heads, self.head_dim, dtype_bytes)[0]


class Family:
    """What every family provides. Subclasses set the class attributes and implement the abstract methods;
    the defaults below hold for the common `model.model.language_model` + `model.lm_head` layout."""

    name: ClassVar[str]  # set by register_family
    model_types: ClassVar[tuple[str, ...]]  # config.json model_type values it loads
    hf_id: ClassVar[str]  # the real checkpoint a tiny preset mirrors and --random-weights builds by default
    positions: ClassVar[Positions]  # position ids and what a merge does to them (models/positions.py)
    presets: ClassVar[tuple[ModelSpec, ...]] = ()  # its model keys, aliases, windows, reference images, tolerances
    tiny_text: ClassVar[dict[str, Any]]  # the tiny preset's text config (its decoder sizes: `tiny_shaped`)

    # --- loading --------------------------------------------------------------------------------------------
    def model_class(self) -> type:
        raise NotImplementedError

    def config_class(self) -> type:
        raise NotImplementedError

    def real_config_dict(self, hf_id: str) -> dict[str, Any]:
        """Keyword arguments of config_class() for a real checkpoint's architecture (no files needed)."""
        raise NotImplementedError

    def tiny_preset(self) -> tuple[Any, Any]:
        """(config, processor) at toy size, built locally; the registry seeds the weights."""
        raise NotImplementedError

    def tiny_shaped(self, config: Any) -> bool:
        """Whether `config` has the tiny preset's decoder (a saved tiny preset, or a fine-tune of one): a local
        checkpoint then starts from the tiny preset's windows and takes its tolerances, else the real preset's."""
        text = config.get_text_config()
        sizes = (int(text.hidden_size), int(text.num_hidden_layers))
        return sizes == (self.tiny_text["hidden_size"], self.tiny_text["num_hidden_layers"])

    def random_processor(self) -> Any:
        """A processor for --random-weights without checkpoint files: a local tokenizer, the real image sizes."""
        raise NotImplementedError

    def processor_from(self, path: Any, tokenizer: Any, image_processor: Any, chat_template: str) -> Any:
        """The family's processor over a checkpoint's (or an engine's) tokenizer and PIL image processor."""
        raise NotImplementedError

    def align_token_ids(self, config: Any, tokenizer: Any) -> None:
        """Point the config's special-token ids at the tokenizer's (when the tokenizer is not the checkpoint's)."""
        raise NotImplementedError

    def check_config(self, config: Any) -> None:
        """Refuse, with one InputError naming the part and what is supported, a checkpoint's config whose parts
        (vision tower, decoder, feature settings) the family cannot export: called as the checkpoint is loaded,
        before any export. The default accepts every config of the family's model types."""

    # --- sizes ----------------------------------------------------------------------------------------------
    def arch(self, config: Any) -> ArchShape:
        """The architecture's sizes, read from `config`; parameter counts from the real classes built on the meta
        device (exact, no memory, no weights)."""
        import torch  # here, not at import: the runtime reads a family's host side without PyTorch

        text = config.get_text_config()
        with torch.device("meta"):
            model = self.model_class()._from_config(config)
        total = sum(p.numel() for p in model.parameters())  # tied weights are one parameter
        language = sum(p.numel() for p in self.text_model(model).parameters())
        head = self.lm_head(model).weight
        if head is not self.text_model(model).embed_tokens.weight:
            language += head.numel()
        return ArchShape(
            num_layers=int(text.num_hidden_layers),
            hidden=int(text.hidden_size),
            heads=int(text.num_attention_heads),
            kv_heads=int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads),
            head_dim=head_dim(text),
            intermediate=int(text.intermediate_size),
            vocab=int(text.vocab_size),
            tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=self.attention_bias(model),
            vision="",
            language_params=language,
            vision_params=total - language,
            first_merge_layer=self.first_merge_layer(config),
        )

    # --- the decoder ----------------------------------------------------------------------------------------
    def attention_bias(self, model: Any) -> bool:
        """Whether the decoder's q / k / v projections have biases, read off the model the config built (Qwen2:
        always; Llama and Mistral: with attention_bias), so one family with several decoders reports each."""
        return getattr(self.text_model(model).layers[0].self_attn.q_proj, "bias", None) is not None

    def text_model(self, model: Any) -> Any:
        """The decoder stack: .layers, .rotary_emb, .norm, .embed_tokens, .config."""
        return model.model.language_model

    def lm_head(self, model: Any) -> Any:
        return model.lm_head

    def spatial_merge(self, model: Any) -> int:
        """Vision-encoder patches per LLM token along each side."""
        raise NotImplementedError

    def first_merge_layer(self, config: Any) -> tuple[int, str]:
        """(the earliest decoder layer a merge stage may follow, 1-based; why). 1 for a decoder that only reads
        the vision tokens. A model that adds vision features to the vision positions after early decoder layers
        (Qwen3-VL's DeepStack, after layers 1..3) returns the last such layer unless its prefill graph compacts
        those features with each stage's `kept`: the schedule solver then places every stage after it and
        says so (method/schedule.py)."""
        return 1, ""

    # --- images ---------------------------------------------------------------------------------------------
    def image_host(self, processor_config: dict[str, Any], *, max_pixels: int | None = None) -> ImageHost:
        """The host image side (images.ImageHost, numpy, no torch) read from processor_config.json: each image
        sized as the checkpoint's processor sizes it, its layout, its vision-graph feeds. `max_pixels` caps the
        processed image below the processor's own limit (--max-image-pixels)."""
        raise NotImplementedError

    def cap_pixels(self, processor: Any, max_pixels: int) -> Any:
        """A copy of the transformers `processor` that sizes no image above `max_pixels` (--max-image-pixels: a cap
        below the checkpoint's own); its saved files carry the cap to the engine's host side. An InputError where
        the family cannot honour it (a processor that crops every image to one larger size)."""
        raise NotImplementedError

    # --- the vision graph -----------------------------------------------------------------------------------
    def vision_export(self, loaded: LoadedModel, image_size: tuple[int, int], dtype: torch.dtype) -> VisionExport:
        """The vision graph, traced on an example image of `image_size` (height, width, as sent) and dynamic in
        everything the model's processor lets vary (Qwen-VL: the number of patches): its inputs are the feeds of
        `image_host(...).prepare`."""
        raise NotImplementedError

    # --- requests -------------------------------------------------------------------------------------------
    def check_inputs(self, processor: Any, images: list, prompt: str) -> None:
        raise NotImplementedError

    def process(self, processor: Any, images: list, prompt: str) -> dict[str, torch.Tensor]:
        """Processor outputs for one request (CPU tensors; no torch model needed, so engines use it too)."""
        raise NotImplementedError

    def vision_embeddings(self, loaded: LoadedModel, processed: dict[str, torch.Tensor]) -> torch.Tensor:
        """[N_vis, D] LLM-width embeddings of `process`'s images, in order."""
        raise NotImplementedError

    def spans(self, processor: Any, processed: dict[str, torch.Tensor], image_token_id: int) -> list[list[VisionSpan]]:
        """Per batch row, each image's vision span with its LLM token grid."""
        raise NotImplementedError

    def embed_and_position(
        self, loaded: LoadedModel, processed: dict[str, torch.Tensor], vision_embeds: torch.Tensor
    ) -> PrefillInputs:
        raise NotImplementedError

    def embed(
        self, loaded: LoadedModel, processed: dict[str, torch.Tensor], vision_embeds: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """`processed` on the model's device, and the text embeddings [B, S, D] with the vision embeddings
        [N_vis, D] written over the image placeholders (what every family's embed_and_position starts with)."""
        model = loaded.model
        processed = {k: v.to(model.device) for k, v in processed.items()}
        input_ids = processed["input_ids"]  # [B, S]
        text_embeds = self.text_model(model).embed_tokens(input_ids)  # [B, S, D]
        return processed, scatter_vision(text_embeds, input_ids, int(model.config.image_token_id), vision_embeds)

    def prepare(self, loaded: LoadedModel, images: list, prompt: str) -> PrefillInputs:
        """One request (images + prompt) -> everything the language-model prefill needs."""
        processed = self.process(loaded.processor, images, prompt)
        vision = self.vision_embeddings(loaded, processed)  # [N_vis, D]
        return self.embed_and_position(loaded, processed, vision)

    def __repr__(self) -> str:
        return f"<family {self.name}>"


FAMILIES: dict[str, Family] = {}


def register_family(name: str, *, model_types: tuple[str, ...]) -> Callable[[type[Family]], type[Family]]:
    """Class decorator: register one instance of the family under `name`, loading config.json `model_types`."""

    def register(cls: type[Family]) -> type[Family]:
        if name in FAMILIES:
            raise ValueError(f"model family {name!r} is registered twice ({FAMILIES[name]!r} and {cls.__name__})")
        cls.name, cls.model_types = name, tuple(model_types)
        FAMILIES[name] = cls()
        return cls

    return register
