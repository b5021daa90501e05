"""Checks for the course's exercises: `check_<name>(your_implementation)` prints one pass line or explains what differs.

`pick(check, yours, reference=...)` runs a check and returns what the notebook goes on with: yours if it passed,
else the reference from `sd`. The shared machinery, and how to add checks for a topic, are in `common.py`.
"""
from .attention import (check_causal_attention, check_cross_attention, check_scaled_dot_product_attention,
                        check_self_attention)
from .clip import check_bpe, check_clip_embedding, check_clip_layer, check_merge_pair, check_sigmoid_fit_error
from .common import pick, try_check
from .controlnet import check_controlled_unet, check_controlnet_loss, check_shape_iou, check_zero_conv
from .consistency import check_consistency_function, check_consistency_loss, check_consistency_sampler
from .diffusion import check_identify, check_predictions, check_shift_schedule
from .editing import check_inpainting_loop, check_inversion_loop, check_slerp
from .flow import check_flow_matching_loss, check_flow_sampler, check_velocity_to_x0_eps
from .fine_tuning import (check_lora_layer, check_prior_preservation_loss, check_textual_inversion_step,
                          check_wrap_with_lora)
from .pipeline import check_cross_attention_maps, check_text_to_image
from .pixel import check_ddpm_sampling, check_pixel_loss
from .sampling import check_classifier_free_guidance, check_ddim_step, check_ddpm_step, check_sampling_loop
from .sigma import (check_dpmpp_2m_sampler, check_error_curve, check_euler_sampler, check_heun_sampler,
                    check_karras_sigmas)
from .training import check_training_step, check_unet_training_loss
from .transformer import (check_adaln_zero, check_final_layer, check_joint_attention, check_patchify,
                          check_unpatchify)
from .unet import (check_geglu, check_res_block, check_spatial_transformer, check_timestep_embedding,
                   check_transformer_block, check_unet_forward)
from .vae import (check_latent_scale, check_reparameterize, check_vae_attention_block, check_vae_decoder,
                  check_vae_encoder, check_vae_residual_block)
from .warmup import check_softmax

__all__ = [
    "pick", "try_check",
    # 00 start here
    "check_softmax",
    # 01 attention
    "check_scaled_dot_product_attention", "check_causal_attention", "check_self_attention", "check_cross_attention",
    # 02 VAE
    "check_vae_residual_block", "check_vae_attention_block", "check_reparameterize", "check_vae_encoder",
    "check_vae_decoder", "check_latent_scale",
    # 03 CLIP
    "check_merge_pair", "check_bpe", "check_clip_embedding", "check_sigmoid_fit_error", "check_clip_layer",
    # 04 diffusion from scratch in pixels
    "check_pixel_loss", "check_ddpm_sampling",
    # 05 UNet
    "check_timestep_embedding", "check_res_block", "check_geglu", "check_transformer_block",
    "check_spatial_transformer", "check_unet_forward",
    # 06 forward diffusion
    "check_predictions", "check_identify", "check_shift_schedule",
    # 07 sampling
    "check_ddpm_step", "check_ddim_step", "check_classifier_free_guidance", "check_sampling_loop",
    # 08 the sigma view
    "check_euler_sampler", "check_karras_sigmas", "check_heun_sampler", "check_dpmpp_2m_sampler", "check_error_curve",
    # 09 text to image
    "check_text_to_image", "check_cross_attention_maps",
    # 10 training
    "check_unet_training_loss", "check_training_step",
    # 11 editing
    "check_inpainting_loop", "check_inversion_loop", "check_slerp",
    # 12 fine-tuning
    "check_textual_inversion_step", "check_lora_layer", "check_wrap_with_lora", "check_prior_preservation_loss",
    # 13 flow matching
    "check_flow_matching_loss", "check_flow_sampler", "check_velocity_to_x0_eps",
    # 14 SD3 in miniature
    "check_patchify", "check_unpatchify", "check_adaln_zero", "check_joint_attention", "check_final_layer",
    # 15 ControlNet
    "check_zero_conv", "check_controlled_unet", "check_controlnet_loss", "check_shape_iou",
    # 16 consistency models
    "check_consistency_function", "check_consistency_loss", "check_consistency_sampler",
]
