"""DreamBooth's prior preservation on notebook 12's star, at a fixed number of steps (the notebook trains for seconds).

    python -m benchmarks.dreambooth_leak MODE STEPS SEED SAMPLES [CLASS_PICTURES [LAMBDA]]
    e.g. plain 400 0 32 (the LoRA alone), pp 240 0 32 (with prior preservation, 8 star + 8 class pictures per step)

Runs notebook 12's own definitions (its cells, by position: the star drawings, the posterior, the LoRA wrapping, the
latent batch, the star test) on the shipped small model, one thread, and prints the training time, the share of
stars among the star prompt's samples, among "a red circle on a blue background" (the leak) and among "a yellow
circle on a black background", and the share of circle-prompt samples the attribute judge reads as a circle.
The README's and notebook 12's fixed-step figures: modes plain and pp, 400/240/600 steps, seeds 0 and 1, 32 samples,
48 class pictures (16 per class prompt).
"""
import copy
import json
import sys
import time
from pathlib import Path

import torch

NOTEBOOK = Path(__file__).resolve().parent.parent / "solutions" / "12_fine_tuning.ipynb"
nb = json.load(open(NOTEBOOK))
cell = lambda i: "".join(nb["cells"][i]["source"])
g = {"torch": torch, "os": __import__("os")}
exec(cell(4), g)
g.update(DEVICE=torch.device("cpu"), DTYPE=torch.float32, FULL_SIZE=False, FULL_SIDE=512, FULL_STEPS=50)
g["plt"].show = lambda *a, **k: None
torch.set_num_threads(1)
from sd.course import load_course_model
pipe = load_course_model(torch.device("cpu")); g["pipe"] = pipe
exec("IMAGE_SIZE=32; N_IMAGES, BATCH = 30, 8; LORA_LR, LORA_RANK = 1e-3, 4; SAMPLE_STEPS=20; GUIDANCE=5.0; COLOR, BACKGROUND='red','blue'", g)
exec(cell(9).split("stars = draw_stars")[0], g)
exec(cell(11), g)
src15 = cell(15).split("PROMPT = ")[0]
exec(src15, g)
exec(cell(22).split("means, logvars = posterior")[0], g)
from sd.adapters.lora import LoRALayer
from sd.adapters.prior_preservation import prior_preservation_loss
from sd.diffusion import diffusion_loss
from sd.training.evaluation import load_classifier
judge = load_classifier(check=False)

mode = sys.argv[1]; steps = int(sys.argv[2]); seed = int(sys.argv[3]); nsamp = int(sys.argv[4])
ncls = int(sys.argv[5]) if len(sys.argv) > 5 else 16
lam = float(sys.argv[6]) if len(sys.argv) > 6 else 1.0
PROMPT = "a red star on a blue background"; CIRCLE = "a red circle on a blue background"
stars = g["draw_stars"](30, seed=0, image_size=32, colors=("red", "blue"))
means, logvars = g["posterior"](pipe, stars)
g["N_SAMPLES"] = nsamp
def samples(model, prompt, n=nsamp, s=0):
    return model.generate([prompt], num_images=n, num_inference_steps=20, guidance_scale=5.0, height=32, width=32,
                          seed=s, output_type="pt", progress=False).float().cpu()
def circle_share(images):
    with torch.no_grad():
        p = judge(images * 2 - 1)[0].softmax(1)
    return float((p[:, 0] >= 0.9).float().mean())
t0 = time.time()
CLASS_PROMPTS = [f"a red {s} on a blue background" for s in ("circle", "square", "triangle")]
if mode.startswith("pp"):
    cls_imgs = torch.cat([samples(pipe, p, ncls, s=100) for p in CLASS_PROMPTS]) * 2 - 1
    cls_means, cls_logvars = g["posterior"](pipe, cls_imgs)
    cls_ctx_all = torch.cat([pipe.encode_prompt([p] * ncls) for p in CLASS_PROMPTS])
    print(f"class images {time.time()-t0:.1f}s", flush=True)
lp = copy.copy(pipe); lp.unet = copy.deepcopy(pipe.unet)
torch.manual_seed(seed)
params = g["reference_wrap_with_lora"](lp.unet, 4, LoRALayer)
ctx = lp.encode_prompt([PROMPT] * 8)
opt = torch.optim.AdamW(params, lr=1e-3)
gen = torch.Generator().manual_seed(seed)
lp.unet.train()
t1 = time.time()
for i in range(steps):
    z = g["latent_batch"](means, logvars, gen)
    if mode.startswith("pp"):
        nb = 8 if mode == "pp" else 4
        z = z[:nb]
        idx = torch.randint(len(cls_means), (nb,), generator=gen)
        zc = (cls_means[idx] + torch.exp(0.5 * cls_logvars[idx]) * torch.randn(cls_means[idx].shape, generator=gen)) * pipe.encoder.config.scaling_factor
        loss = prior_preservation_loss(lp.unet, lp.scheduler, z, ctx[:nb], zc, cls_ctx_all[idx], gen, lam)
    else:
        loss = diffusion_loss(lp.unet, lp.scheduler, z, ctx, gen)
    opt.zero_grad(); loss.backward(); opt.step()
dt = time.time() - t1
lp.unet.eval().requires_grad_(False)
t2 = time.time()
s_star = samples(lp, PROMPT); s_circ = samples(lp, CIRCLE); s_sq = samples(lp, "a yellow circle on a black background")
ts = time.time() - t2
sf = g["star_fraction"]
print(f"{mode} lam={lam} seed={seed} steps={steps} train {dt:.1f}s ({dt/steps*1000:.0f} ms/step) sampling 3x{nsamp}: {ts:.1f}s | "
      f"star prompt: stars {sf(s_star):.2f} | circle prompt: stars {sf(s_circ):.2f}, judged circle {circle_share(s_circ):.2f} | "
      f"yellow circle prompt: stars {sf(s_sq):.2f}", flush=True)
