"""The networks of ctok. Import the module you need; this package imports none of them.

Models with a checkpoint format (config.json + model.safetensors):
    base                  PretrainedModel: kind, config_class, the one config policy, from_config /
                          to_config, from_pretrained / save_pretrained
    files                 the files of a checkpoint folder: read_config, read_weights, load_weights,
                          write_checkpoint, LoadReport
    presets               the released families by preset name and the hub ids of released weights
    tokenizer             Tokenizer (kind "tokenizer", variant "softvq" or "maetok"), TokenizerConfig
    diffusion_transformer SiT (kind "sit"), DiT (kind "dit") and their configs
Their parts:
    vit, rope, quantizers the tokenizer's ViT encoder / decoder, RoPE-Mixed, the SoftVQ quantizer
Training only:
    auxiliary_decoders, discriminators, teachers
The demo's evaluation network:
    fmnist_classifier

Imports run one way: ``ctok.hub`` (source resolution, kind registry) imports only ``files`` and
``presets``; ``base`` imports the hub; the model modules import ``base``; ``ctok.loading`` imports
the model modules. Nothing imports a module above its own layer, not even inside a function.
"""
