"""Prototype routing policies on the quality suite's harness (issue 7), in Python, before the
Rust core gets them. The "lca" family became policy "heldout" (`molf.heldout`):

    python3 research/policy_lab.py both lca:10:3:re1a:2 --regimes high-rank low-rank-noisy   # the shipped policy
    python3 research/policy_lab.py --full --baseline benches/results/quality-full-synthetic/results.json \
        lca:10:0.5:re1z:2:1 --regimes high-rank

A spec routes MoLF (dense + LoRA r=8), or MoLF-E (r4 + r32) with the prefix "E/":
* ``both``: every expert every step (k = 2);
* ``lca:K:D:RULE[:DWELL[:Z]]``: every K steps a validation gradient; each expert's held-out
  loss-change allocation over the window (trapezoid rule, env LCA_RIGHT=1: right-point rule),
  its EMA (decay D; D >= 1: decay max(0.5, 1 - D/n) at window n, a horizon growing with the
  run, mean age ~n/(D+1)), and RULE: ``drop`` (drop experts that raised the loss, for good),
  ``dropkeep`` (but keep the best), ``re1`` (drop; re-admit on positive first-order potential
  after DWELL windows), ``re1a`` (re1, a returning expert's horizon restarts: the shipped
  rule), ``re1aw`` (re1a; an expert drops only once its record spans Z windows since the
  start or its return: shipped as ``heldout_min_span``), ``re1z`` (drop only when the EMA's harm exceeds Z standard errors), ``re1m`` (re1 with the dwell counted from the module's last change, as
  the Rust router did until 2026-11-29 10:30 UTC), ``re1n`` (re1, a re-admitted expert's EMA
  restarts with its next window), ``re1p`` (re1, a re-admitted expert's EMA restarts at its potential),
  ``gr`` (re1, and drop an expert whose held-out/training descent ratio is below Z x the
  module's best), ``re2``, ``rel``.
Env REVERT=dense|all[-ema[-global]|-z]: undo a window's movement of the dense (or any) expert
when it raised the held-out loss (-ema: only when the expert is dropped at that measurement;
-global: and only in a window where the whole model's held-out loss rose; -z: only beyond RZ
standard deviations of its record); env LR=x: that learning rate, no selection; env VAL_ONLY=1:
the validation instance only; env CACHE=dir: where the pre-trained LM is cached; env
DEVICE=cuda: run there; env SEEDS=a-b: those test seeds.
Spec ``shrink:K:DELTA``: every K steps, each expert's update since the start (all modules
together) scaled by 1 - DELTA, kept if the held-out loss falls (chained after a routing spec as
``A+shrink:K:DELTA``: shipped as ``heldout_shrink``). Spec ``sshrink:K:TAU[:MODE]``: the same, but
a LoRA expert's product has its singular values soft-thresholded by TAU x its largest
(``molf.heldout.spectral_shrink_b``); MODE ``softd`` scales the dense expert's update first (the
shipped trial), ``softm`` tries each module alone, ``softr`` up to three times in a row. Spec ``abr:K:BETA`` (chained after a routing spec): A's and B's step shares from the
held-out cosines of their movement (rejected, seventh round). Spec ``hg:K:BETA:LO:HI``: soft routing, a
per-module multiplier of each expert's step updated from the cosine of its window movement
with the held-out gradient, clipped to [LO, HI] (rejected, see the fourth round).
Env NO_VAL=1 (with LR): the test seeds only.
LoRA experts at quality.py's scales: rsLoRA alpha = r (s = sqrt(r)) beside a dense expert,
alpha / r = 1 for ``E/`` (until the seventh round ``E/`` ran at rsLoRA alpha = r, which
LORA_ALPHAS=4,32 reproduces). Env LORA_SCALE=c: every LoRA expert at scale s = c (alpha = c x r,
alpha / r); env LORA_ALPHAS=a[,b]: rsLoRA with these alphas, one per expert. Spec ``ada:INIT:TARGET[:noprune]``: peft's AdaLoRA as
quality.py builds it, with those ranks (``noprune``: no rank allocation, the budget never
shrinks), for ablations.
Env LORA_X=c: LoRA experts at c x the learning rate. Env WARM=k: the costliest expert (dense, or
MoLF-E's largest LoRA) starts dropped and stays out for k windows ("Occam start"); the usual
re-admission rule then brings it back. Spec ``only:E``: expert E alone, every step.
Learning rate grid and seeds as quality.py --quick (or --full); FFT/LoRA/AdaLoRA from --baseline.
The figures below were measured on quality.py's earlier four-point grids ({3e-4 … 1e-2} quick,
{1e-4 … 3e-3} full); the six-point grids choose the same rates for every method but AdaLoRA
(and MoLF-E on full low-rank-noisy).

Measured (2-core CPU, quick scale unless noted; gap to the better of FFT/LoRA):
* ``both``: high-rank −9.5%, low-rank-noisy +8.7%, mixed +2.2%, shift −3.1%, facts +1.1%, sql −1.3%;
* ``lca:10:0.5:re1:2`` (shipped until this round): −9.9%, +0.6%, −1.5%, −5.9%, +1.1%, 0.0%; full scale high-rank +43%;
* ``drop`` without re-admission: shift +474% (the held-out set is the post-shift target: every
  expert is dropped in the first half and can never return);
* right-point instead of trapezoid: high-rank +45%, mixed +17% (curvature double-counted);
* ``re1z`` z=1: quick low-rank-noisy +8.6% (no drop), full high-rank −0.9%;
* ``re1b`` (re-admission dwell doubling per re-admission): quick −9.9%, −0.1%, −3.3%, +0.2% on
  the four synthetic regimes; full high-rank +80%, low-rank-noisy +5.8%;
* ``re1zb`` z=1: quick low-rank-noisy +8.6%; full high-rank +13.4%, low-rank-noisy +8.3%.
The tension: at full scale a window's held-out change is noise around zero near convergence
(drops must need evidence, z > 0), at quick scale the noisy regime's harm must be acted on
from weak evidence (z = 0). No rule tried meets the 1.5% target at both scales.

Second round (2026-11-29 09:30-10:20 UTC, same machine; quick | full, four synthetic regimes
high-rank / low-rank-noisy / mixed / shift, gap to the better of FFT/LoRA):
* found: at full scale high-rank the per-window held-out change is ±4e-3 around a drift of
  −1.2e-3 (trapezoid sums match the actual change); the fluctuations telescope, so an average
  over a span of S windows has noise ~1/S, not 1/√S: the span must grow with the run;
* ``lca:10:3:re1:2`` (shipped until the third round: growing horizon, mean age ~n/4,
  heldout_horizon=0.25; the dwell per expert):
  −9.5 / +8.7 / −1.0 / −3.3 | −10.3 / +8.6 / −7.9 / −7.8;
* ``lca:10:5:re1:2``: −8.8 / +8.8 / −2.3 / −4.1 | −1.6 / +8.3 / −7.9 / −15.7;
* ``lca:10:8:re1:2``: −9.9 / +0.6 / −1.5 / −5.9 | +21.3 / +8.1 / −7.3 / −7.9 (quick unchanged:
  the horizon starts growing only after 16 windows);
* ``lca:10:5:re1p:2``: −9.0 / +8.8 / +1.7 / −4.4 | −10.9 / +8.6 / −7.7 / −12.3;
* ``lca:10:3:re1b:2``: −9.5 / +8.7 / +2.2 / −4.9 | −10.8 / +8.8 / −7.7 / −9.9;
* ``lca:10:3:gr:2:0.5``: −7.3 / +8.7 / −2.3 / +12.2 | −1.4 / +8.5 / −7.8 / +3.2;
* LORA_X=3 ``lca:10:3:re1:2``: −4.9 / −1.7 / +0.7 / +7.9 | +11.8 / +4.9 / −8.5 / +9.5;
  LORA_X=3 ``lca:10:0.5:re1:2``: −2.9 / −2.5 / −0.3 / +2.8 | +37.9 / +1.8 / −5.3 / −7.6.
* found: ``lca:10:3:re1m:2`` reproduces the Rust router's per-seed results exactly (quick shift
  0.171 / 0.125 / 0.278, mixed 0.217 / 0.106 / 0.202); the lab's per-expert dwell (``re1``)
  gives quick shift −3.3% where the router's per-module dwell gave +4.1% (one expert's drop
  held the other's return back): the router now counts the dwell per expert;
* ``lca:10:3:re1n:2`` (a returning expert's record restarts): −9.5 / +8.7 / −1.0 / −6.3 |
  −10.6 / +8.7 / −7.8 / −12.4 — quality.py's real runs with it in the router gave the same
  figures; but ``molf demo``'s low-rank-noisy regime, whose validation split is noisy,
  went from +54% to +102% (the first window after a return decides, and with noise it
  often says "helps"): not shipped. ``lca:10:3:re1p:2``: −9.5 / +8.7 / −1.5 / −4.7 |
  −10.6 / +8.7 / −7.7 / −11.9.
Low-rank-noisy stays the miss: its validation picks the smallest learning rate, at which
both experts lower the held-out loss to the end (nothing to drop); at the next one (full,
3e-4) both overfit from step ~350 and even stopping both there only ties the smaller rate,
while LoRA alone at 3e-4 generalises better — a difference no per-window held-out signal
sees in time.

Third round (2026-11-29 11:40-12:10 UTC, same machine):
* counterfactuals, quick low-rank-noisy: MoLF-E's r4 alone (``E/only:0``) 0.297 at lr 3e-3
  (−12.2% to the better of FFT/LoRA, +5.5% to AdaLoRA's 0.281); r32 alone 0.343; r8 alone
  0.344: routing between these LoRA experts cannot put MoLF-E ahead of AdaLoRA there;
* diagnostics at quick scale, lr 1e-3, every expert every step (one seed): the cosine between
  an expert's window movement and the held-out gradient is higher for the dense expert than
  for LoRA in every regime, the noisy one included; the held-out/training descent ratio (full
  training-set gradient) separates the noisy regime (0.63-0.73 in the first window) from the
  clean ones (0.95-1.15), but alike for both experts, so it says "noisy data", not "which
  expert"; with the dense expert held out, its potential outside LoRA's tangent space
  ((I - P_B) G (I - P_A)) stays comparable to LoRA's own potential in both regimes; the
  gradient signal-to-noise ratio from Adam's moments (m^2 / v, GSNR) is low and alike for
  both experts in all three regimes after step ~40;
* Occam start (WARM=1, dense back after the usual dwell, step ~30), ``lca:10:3:re1:2``:
  quick −9.5 → +2.8 / +8.7 → +1.7 / −1.0 → +0.9 / −3.3 → 0.0; full high-rank −10.3 → +10.7,
  low-rank-noisy +8.6 → +9.1, mixed −7.9 → −6.9, shift −7.8 → +1.7: rejected (at full scale
  validation picks lr 1e-4, where the delay only costs). WARM=1, 2, 3 give identical results
  (the dwell, not the warm-up, decides the return);
* ``re1a`` (**shipped** as the Ledger's per-expert span, format version 4): a returning
  expert's horizon restarts, so its pre-drop record fades (decay 0.5 for ~6 windows) instead
  of dropping it again at the next measurement: quick −9.5 / +8.7 / −1.0 / −5.8 | full
  −10.2 / +8.5 / −7.9 / −17.8; MoLF-E (``E/``) full shift +9.4 → −12.0 (AdaLoRA +3.2 →
  −17.1); ``molf demo``'s noisy low-rank row 0.4729 → 0.4847 (the lab reproduces the
  demo's 0.0638 / 0.4729 exactly with ``re1``).
* undoing harmful windows, on top of ``re1a`` (quick | full, four synthetic regimes):
  REVERT=dense (every harmful window of the dense expert): −7.4 / −3.2 / −3.4 / −4.5 |
  +125 / +3.9 / −13.1 / −14.1 (at full scale one window's change is mostly noise: high-rank
  loses its progress); REVERT=all: −1.1 / +0.5 / −1.5 / −6.3 (quick); REVERT=dense-z, RZ=1:
  −8.6 / +0.3 / −6.5 / −5.8 | +25.8 / +8.2 (high-rank, noisy); REVERT=dense-ema: −9.5 / −0.7 /
  −6.4 / −3.0 | −10.3 / +8.5 / −11.5 / −18.2, quick facts −3.4, sql −1.3; REVERT=all-ema
  (a dropped expert's harmful last window is undone): −9.5 / −1.6 / −6.7 / −3.7 |
  −9.9 / +5.8 / −12.8 / −20.0, and in the router (commit 1f3bb12) quality.py --quick gave
  −9.5 / −1.6 / −6.7 / −3.7 / −4.6 / −1.3 (every quick cell within 1.5%) — but full-scale
  sql on the H200 (``--regimes sql --methods "molf default" --lrs 1e-3 --seeds 5``, the rate
  every version chose) fell to 0.685 (per seed 0.31 / 0.19 / 1.00 / 0.94 / 1.00; validation
  0.586 against 0.984 without it; the dense expert active in 34% of modules at the end, 223
  switches): in the LM each module's window change is small and noisy, drops are frequent,
  and every undone window is progress lost. Reverted (commit ee2a050). REVERT=all-ema-global
  (undo only in a window where the whole model's held-out loss rose, so per-module noise in a
  still-improving model does not fire it): −9.5 / −1.5 / −5.7 / −3.9 | −10.6 / +8.4 / −12.9 /
  −19.7 (undone windows per full run: 2.8 / 6.2 / 96 / 13); full-scale sql, validation
  instance, lr 1e-3, on this 2-core CPU (``CACHE=.device/cache VAL_ONLY=1 LR=1e-3 ... --full
  --regimes sql``, 26 minutes a run, two at once): 0.922 with 139 undone windows, against
  0.863 for ``re1a`` alone (the H200 gave 0.984 for it: CPU and GPU runs of this bimodal task
  differ). In the router (commit bf9ceb4, reverted in c2386d7), quality.py --quick gave −9.5 /
  −1.5 / −5.7 / −3.9 / −2.3 / −1.3, but full-scale sql on the H200 (5 seeds, the lr grid) 0.381
  (validation 0.578 / 0.531 at 3e-4 / 1e-3, against 0.809 / 0.984 without it). At full-scale
  low-rank-noisy and LR=3e-4, dense-ema still ends at 0.2815 (+10.7%): the dense expert's
  early memorisation is not undone by a drop.
* ``both`` on full-scale sql, 20 seeds on the H200 (``DEVICE=cuda LR=1e-3 SEEDS=a-b``): 0.751,
  molf default 0.761, FFT 0.838 (``research/seed_stats.py``): molf default's sql gap is that of
  training both experts every step, not of its drops; with LORA_X=0.3 / 0.1, ``both`` scores
  0.658 / 0.767: a smaller LoRA step does not close it (bimodal seeds, SE ~0.06).
Fourth round (2026-12-01 and 12-02, this CPU and one H200):
* ``hg:10:...`` (hypergradient soft routing): full high-rank +73% / +140% (two settings):
  a cosine against the held-out gradient shrinks the dense step where it is needed. Rejected.
* ``both`` with the dense expert at 3e-5 and LoRA at 3e-4 (LORA_X=10): full low-rank-noisy
  +1.2%. The learning-rate ratio is the lever there, but a fixed ratio is a per-task setting.
* ``lca:10:3:re1a:2+shrink:10:0.1`` (**shipped** as ``heldout_shrink=0.1``): the shrink trial
  is an L2 pull towards the start whose strength the held-out loss chooses, per expert; on
  low-rank-noisy it pulls the dense expert back (it memorises the noise) and keeps LoRA. The
  router first counted a dropped expert that a kept trial scaled as moved, which this
  prototype does not; since commit ba7623e they agree to the digits measured (quick low-rank-noisy validation at
  1e-3: dense + LoRA 0.3097 both, ``E/`` 0.300 both; before, the router had 0.3104 and
  0.322). Quick, the router (quality.py, 2026-12-03): −9.0 / −3.3 / −0.4 / −9.1 / +2.7 /
  +0.0 (facts and sql: 3 seeds, a few items apart; 20 seeds in benches/RESULTS.md at dcb39bc);
  full synthetic: see benches/RESULTS.md at dcb39bc. Full sql on the H200, the router before that fix, 20
  seeds at 1e-3: 0.921 against FFT's 0.838; at 3e-4 it stalls like FFT (molf default 0.464 over 20 seeds,
  FFT 0.406 over 10, ``lca:10:3:re1a:2`` without shrink 0.487 over 10): shrinkage is not what
  makes 3e-4 a bad rate there.
Fifth round (2026-12-03, this CPU and the H200 host's 16 CPU cores; MoLF-E ``E/`` against
AdaLoRA unless noted):
* ``sshrink:K:TAU`` (spec above; shipped as the spectral LoRA trial, ``heldout_shrink_spectral``):
  ``E/lca:10:3:re1a:2+sshrink:10:0.1`` quick low-rank-noisy 0.2512 (−10.7%; the router 0.2512 too),
  full 0.159 (−36.4%); a first version that set B' = ΔW' A⁺ (the minimum-norm B, which moves B
  where r > in) gave 0.268 / 0.155: A's later steps follow B, so the router moves B by
  (ΔW' − ΔW) A⁺ only. With the scaling trial before the spectral one, quick 0.315 (+11.9%); the
  leading direction kept and the rest scaled by 0.9, quick 0.291 (+3.3%). ``sshrink:10:0.1:softd``
  (dense + LoRA r=8, the dense trial scaled): quick −9.5 / −4.5 / −0.9 / −10.0 (the router the same).
* full mixed, where MoLF-E trails AdaLoRA (0.140): every variant 0.145–0.147 — TAU 0.05 / 0.2 /
  0.3, trials every 5 steps, ``softr`` (up to 3 kept trials in a row), ``softm`` (one trial per
  module and expert), the scaling trial after the spectral one; TAU 0.2 / 0.3 lose low-rank-noisy
  (+9.9% / +32.0%).
Sixth round (2026-12-03 afternoon, this CPU; ``E/lca:10:3:re1a:2+sshrink:10:0.1:softd``, the
router's MoLF-E default, against AdaLoRA):
* full mixed over 20 seeds (quality.py, seeds 5-19 added): molf-E default 0.154, AdaLoRA 0.145
  (+6.4%, paired +0.009 ± 0.002); ``E/only:1`` (r = 32 alone) 0.150, ``E/both`` 0.151;
* ``ada:36:32:noprune`` (AdaLoRA, allocation off) 0.141 against ``ada:36:32`` 0.140 (= quality.py's):
  AdaLoRA's lead is not its rank allocation. Its scale is alpha / r = 1; rsLoRA alpha = r gives
  MoLF-E's experts 2 and 5.7. The learning rate is not the lever: at rsLoRA scale, lr 1.77e-4 /
  5.3e-4 (the effective rates of scale 1 at 1e-3 / 3e-3 for r = 32) give 0.150 / 0.151;
* ``LORA_SCALE=1`` (both at scale 1): full mixed 0.135 (−3.9%; 20 seeds −2.6%), high-rank −24.1%,
  low-rank-noisy −34.7%, shift −0.9%; quick −21.5 / −16.4 / −13.6 / −3.1, facts −23.6%, but sql
  picks 1e-2: +30.3% (20 seeds 0.324 against 0.387, +16.2%);
* ``LORA_ALPHAS=4,5.657`` (r = 4 at 2, r = 32 at 1): full mixed −4.6% (20 seeds −2.9%), high-rank −27.4%,
  low-rank-noisy −34.7%, shift −1.0%; quick −22.6 / −14.3 / −12.7 / −1.8, facts −26.6%; quick sql
  3e-3 and 1e-2 tie on validation (0.4375): at 3e-3 (the lab's pick) 0.405 over 20 seeds (−4.6%),
  but quality.py's router, whose validation gives 0.500 at 1e-2, picks that: 0.281 on 3 seeds,
  0.322 over 20 (+16.8%);
  ``LORA_SCALE=2`` (both at 2): full mixed +5.7% (validation picks 3e-4);
  ``LORA_ALPHAS=4,4``: full mixed −4.8%, quick sql picks 1e-2 (+11.8% on 3 seeds).
  No one scale puts MoLF-E ahead on both full mixed and quick sql; a scale chosen per task
  would be the per-task tuning issue 7 rules out, unless the held-out signal chose it.
Seventh round (2026-12-03 evening, this CPU; the same spec):
* env SHOW_SHRINKS=1 prints each run's kept spectral trials per expert. On full mixed at 3e-4,
  r = 4 has 47–99 kept trials per run and r = 32 has 0–1; on quick sql at 1e-3, 9 and 0. So a
  rule that lowers an expert's scale when its trials are kept would lower the wrong expert.
* ``abr:K:BETA`` (chained; `ABRatio`): the step shifts between A and B (product of the
  multipliers 1) by the cosines of their window movement with the held-out gradient.
  ``+abr:10:0.5``: full mixed 0.147 (+4.6% against AdaLoRA; validation 0.123 against 0.128),
  quick sql 0.344 (+13.2%). Rejected.
* What quality.py now does instead (benchmark, not router): MoLF-E's experts at AdaLoRA's
  alpha / r = 1, and sql's rate chosen on three validation instances. At scale 1, quick sql's
  single instance had ranked 1e-2 first (0.469 against 0.422 at 3e-3), while test seeds average
  0.32 at 1e-2 and 0.41 at 3e-3. The figures are in benches/RESULTS.md at dcb39bc, "What changed", item 6.
Eighth round (2026-12-05, this CPU; quick shift, where molf-E default ties AdaLoRA over 100
seeds; ``SEEDS=0-99``, JSON in research/results/quality-quick/runs/lab-E-both-sshrink/):
* at lr 3e-3, test seeds only (``LR=3e-3 NO_VAL=1``), paired to AdaLoRA's 100 seeds:
  the shipped ``E/lca:10:3:re1a:2+sshrink:10:0.1`` 0.225 (+0.3%, the router's per-seed values);
  the same without shrinkage 0.242 (+8.0%); ``E/only:1`` (r = 32 alone) 0.222 (−0.9%);
  ``E/both`` 0.218 (−2.9%); ``E/both+sshrink:10:0.1`` 0.213 (−5.2%). On shift, dropping and
  re-admitting LoRA experts costs what the shrink trial gains;
* ``E/both+sshrink:10:0.1`` with its rate chosen as quality.py does, four synthetic regimes,
  against AdaLoRA (paired, 100 seeds): high-rank −17.8%, low-rank-noisy −2.2% (−0.005 ±
  0.003), mixed −9.9%, shift −9.9% (0.202 at 1e-2), against the shipped rule's −20.1%, −3.4%,
  −10.5%, +0.3%. Ahead on all four: a lead for the LoRA + LoRA mixture (no drop rule, the
  spectral trial alone);
* the same at full scale (``--full``, ``SEEDS=0-19``, JSON in
  research/results/quality-full-synthetic/runs/lab-E-both-sshrink-*.json), paired to AdaLoRA on
  the seeds it has: high-rank −28.4% (5 seeds), low-rank-noisy −20.8% (20), mixed −1.7% (20,
  shipped −2.6%), shift −0.8% (20, −0.001 ± 0.002; shipped −4.8% over 100). Ahead everywhere but
  thinner than the shipped rule on full mixed and shift: the drop rule earns its keep at full
  scale. Not yet run on the LM regimes; the router is unchanged.
Ninth round (2026-12-05, this CPU; JSON in research/results/quality-quick/runs/lab-E-min-span/ and
research/results/quality-full-synthetic/runs/lab-E-min-span/):
* why the drops cost on quick shift: the held-out batch is the post-shift target, so learning
  the first target raises it and MoLF-E's experts drop from window 2 on (seed 0: every module's
  r = 4 and r = 32 out at windows 7-9, the modules frozen) and return at the shift; frozen
  pairs near B = 0 then learn the second target more slowly than pairs trained all along;
* ``re1aw``, the drop rule with a minimum span of Z windows, E/ at lr 3e-3, test seeds 0-99:
  Z = 6 0.222, Z = 10 0.213 (``E/both+sshrink`` 0.213, shipped 0.225);
* ``E/lca:10:3:re1aw:2:10+sshrink:10:0.1``, rates chosen as quality.py does, paired to AdaLoRA
  (quick: 100 seeds; full: 20, high-rank 5): quick −18.3 / −2.8 / −10.4 / **−9.9%** (shipped
  −20.1 / −3.4 / −10.5 / +0.3%); full −28.5 / −31.0 / −2.6 / −3.2% (shipped −24.1 / −34.7 /
  −2.6%, shift over the same 20 seeds paired to it −0.6%): both benefits kept. Quick facts
  0.872 over 20 seeds (the lab's one validation instance picks sql's 1e-2, which quality.py's
  three do not: run there);
* the same rule beside a dense expert (``lca:10:3:re1aw:2:10+sshrink:10:0.1:softd``), paired to
  molf default over 100 quick seeds: +0.1 / +1.2 / +1.1 / +0.4% (each ≥ 3 SE): a dense expert
  carries its module while the LoRA expert is out, and the early drops pay there.
  **Shipped** for LoRA-only mixtures (``heldout_min_span`` 10, format version 7); 0 beside a
  dense expert.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benches"))  # quality.py
import molf  # noqa: E402
import quality as q  # noqa: E402
from molf.wrap import expert_tag  # noqa: E402


import os
RIGHT = os.environ.get('LCA_RIGHT') == '1'


class Fixed:
    """Stands in for the optimizer's router: the Rust router still counts steps, the lab decides."""

    def __init__(self, real, mask):
        self.real, self.mask = real, mask

    def route(self, scores):
        self.real.route(scores)
        return self.mask.copy()

    def __getattr__(self, name):
        return getattr(self.real, name)


class LCA:
    """Held-out loss-change allocation: every K steps a validation gradient; each expert's
    parameter movement over the window, dotted with the mean of the two end gradients
    (trapezoid: exact on a quadratic), is its share of the held-out loss change."""

    def __init__(self, model, opt, inst, every, decay, rule, extra):
        self.model, self.opt, self.inst, self.every, self.decay, self.rule, self.extra = (
            model, opt, inst, every, decay, rule, extra)
        self.M, self.E = len(opt.module_names), len(opt.expert_names)
        orders = sorted({t.order for p in model.parameters() if (t := expert_tag(p)) is not None})
        self.where = [(p, orders.index(t.order), t.expert, g) for g in opt.param_groups for p in g["params"]
                      if (t := expert_tag(p)) is not None]
        self.params = [w[0] for w in self.where]
        self.mask = np.ones((self.M, self.E), bool)
        self.warm = int(os.environ.get("WARM", "0"))  # windows with expert 0 held out (LoRA first)
        # the costliest expert: the dense one, else the largest LoRA (MoLF-E: the last)
        self.big = 0 if any(t.kind == "dense" for _, _, t, _ in ((None, None, expert_tag(p), None) for p in self.params)) else self.E - 1
        if self.warm:
            self.mask[:, self.big] = False
        self.mask_before = self.mask.copy()
        self.ema = None
        self.snap = None
        self.g_prev = None
        opt._router = Fixed(opt._router, self.mask)
        self.history = []

    def grads(self):
        with torch.enable_grad():
            loss = self.inst.loss(self.model, self.inst.heldout)
            return torch.autograd.grad(loss, self.params, allow_unused=True)

    def __call__(self, step):
        if step % self.every:
            return
        was_training = self.model.training
        g_now = self.grads()
        g_now = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, g_now)]
        t_now = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in self.params]
        if self.snap is not None:
            tr = np.zeros((self.M, self.E))
            for (p, m, e, _), s, a, b in zip(self.where, self.snap, self.t_prev, t_now):
                tr[m, e] += float(((a + b) * (p.detach() - s)).sum()) / 2
            tr /= self.every
            lca = np.zeros((self.M, self.E))
            for (p, m, e, _), s, a, b in zip(self.where, self.snap, self.g_prev, g_now):
                lca[m, e] += float(((a + b) * (p.detach() - s)).sum()) / 2 if not RIGHT else float((b * (p.detach() - s)).sum())
            lca /= self.every
            # a frozen expert did not move: keep its last estimate instead of decaying it to 0
            fresh = self.mask_before
            self.n = getattr(self, "n", 0) + 1
            # D >= 1: a horizon growing with training, decay 1 - D/n over the n windows so far
            d = self.decay if self.decay < 1 else max(0.5, 1 - self.decay / self.n)
            if self.rule in ("re1a", "re1aw"):  # the horizon counts per expert, from its last return
                self.age = getattr(self, "age", np.zeros((self.M, self.E))) + 1
                d = np.maximum(0.5, 1 - self.decay / self.age) if self.decay >= 1 else d
            if self.ema is None:
                self.tema = np.where(fresh, tr, 0.0)
            else:
                self.tema = np.where(fresh, d * self.tema + (1 - d) * tr, self.tema)
            if self.ema is None:
                self.ema = np.where(fresh, lca, 0.0)
                self.sq = np.where(fresh, lca**2, 0.0)
            else:
                upd = np.where(np.isnan(self.ema), lca, d * self.ema + (1 - d) * lca)  # NaN: restarted
                self.ema = np.where(fresh, upd, self.ema)
                self.sq = np.where(fresh, d * self.sq + (1 - d) * lca**2, self.sq)
            self.pot = self.potential(g_now)
            self.decide(step)
            revert = os.environ.get("REVERT")  # "all" / "dense": undo a window's harmful movement
            if revert:
                harm = fresh & (lca > 0)
                if "-ema" in revert:  # only where the smoothed record says harm too
                    harm &= self.ema > 0
                if revert.endswith("-global"):  # only in a window where the held-out loss rose
                    harm &= bool(lca[self.mask_before].sum() > 0)
                if revert.endswith("-z"):  # only a window beyond RZ standard deviations of the record
                    sd = np.sqrt(np.maximum(self.sq - self.ema**2, 0.0))
                    harm &= lca > self.ema + float(os.environ.get("RZ", "1")) * sd
                if revert.startswith("dense"):
                    harm[:, 1:] = False
                if harm.any():
                    self.undos = getattr(self, "undos", 0) + int(harm.sum())
                    with torch.no_grad():
                        for (p, m, e, _), s in zip(self.where, self.snap):
                            if harm[m, e]:
                                p.copy_(s)
                    g_now = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, self.grads())]
        self.snap = [p.detach().clone() for p in self.params]
        self.g_prev = g_now
        self.t_prev = t_now
        self.mask_before = self.mask.copy()
        self.model.train(was_training)

    def potential(self, g_val):
        """First-order held-out loss change per step if each expert took its Adam step."""
        pot = np.zeros((self.M, self.E))
        for (p, m, e, grp), gv in zip(self.where, g_val):
            st = self.opt.state.get(p)
            if not st:
                continue
            (b1, b2), t = grp["betas"], float(st["step"])
            d = (st["exp_avg"] / (1 - b1**t)) / ((st["exp_avg_sq"] / (1 - b2**t)).sqrt() + grp["eps"])
            pot[m, e] -= grp["lr"] * float((gv * d).sum())
        return pot

    def decide(self, step):
        ema = self.ema
        if self.rule == "drop":  # keep the experts whose movement lowers held-out loss
            new = (ema < 0) & self.mask
        elif self.rule == "dropkeep":  # same, but the most helpful (or least harmful) stays
            new = (ema < 0) & self.mask
            best = np.argmin(np.where(self.mask, ema, np.inf), 1)
            new[np.arange(self.M), best] |= ~new.any(1)
        elif self.rule == "rel":  # drop an expert that helps less than `extra` x the best's help
            new = self.mask & (ema < 0)
            best = np.min(np.where(self.mask, ema, np.inf), 1, keepdims=True)
            new &= ema <= self.extra * best
        elif self.rule == "re1":  # drop on realized harm; re-admit when the first-order potential helps
            new = (ema < 0) & self.mask
            self.since = getattr(self, "since", np.zeros((self.M, self.E), int)) + 1
            back = ~self.mask & (self.pot < 0) & (self.since > self.extra)
            new |= back
            self.since[new != self.mask] = 0
        elif self.rule == "re1p":  # like re1; a re-admitted expert's EMA restarts from its potential
            new = (ema < 0) & self.mask
            self.since = getattr(self, "since", np.zeros((self.M, self.E), int)) + 1
            back = ~self.mask & (self.pot < 0) & (self.since > self.extra)
            new |= back
            ema[back] = self.pot[back]
            self.since[new != self.mask] = 0
        elif self.rule == "gr":  # re1, and drop an expert whose held-out/training descent ratio is
            # below z x the module's best ratio (it fits the training set's noise)
            ratio = np.where(self.tema < 0, ema / np.minimum(self.tema, -1e-30), 0.0)
            best = np.max(np.where(self.mask, ratio, -np.inf), 1, keepdims=True)
            new = (ema < 0) & self.mask & ~((ratio < self.z * best) & (best > 0))
            self.since = getattr(self, "since", np.zeros((self.M, self.E), int)) + 1
            back = ~self.mask & (self.pot < 0) & (self.since > self.extra)
            new |= back
            self.since[new != self.mask] = 0
        elif self.rule == "re1m":  # re1 with the router's timing: the dwell counts from the module's last change
            new = (ema < 0) & self.mask
            self.since = getattr(self, "since", np.zeros((self.M, 1), int)) + 1
            back = ~self.mask & (self.pot < 0) & (self.since > self.extra)
            new |= back
            self.since[(new != self.mask).any(1)] = 0
        elif self.rule == "re1a":  # like re1; a re-admitted expert's EMA horizon restarts (age 0)
            new = (ema < 0) & self.mask
            self.since = getattr(self, "since", np.zeros((self.M, self.E), int)) + 1
            back = ~self.mask & (self.pot < 0) & (self.since > self.extra)
            new |= back
            self.age[back] = 0
            self.since[new != self.mask] = 0
        elif self.rule == "re1aw":  # like re1a; an expert drops only once its record spans Z windows
            new = ((ema < 0) | (self.age < self.z)) & self.mask
            self.since = getattr(self, "since", np.zeros((self.M, self.E), int)) + 1
            back = ~self.mask & (self.pot < 0) & (self.since > self.extra)
            new |= back
            self.age[back] = 0
            self.since[new != self.mask] = 0
        elif self.rule == "re1n":  # like re1; a re-admitted expert's EMA restarts with its next window
            new = (ema < 0) & self.mask
            self.since = getattr(self, "since", np.zeros((self.M, self.E), int)) + 1
            back = ~self.mask & (self.pot < 0) & (self.since > self.extra)
            new |= back
            ema[back] = np.nan
            self.since[new != self.mask] = 0
        elif self.rule == "re1z":  # drop only when the EMA's harm is beyond z standard errors
            n_eff = (1 + self.decay) / (1 - self.decay)
            se = np.sqrt(np.maximum(self.sq - ema**2, 0.0) / n_eff)
            new = ~(ema - self.z * se > 0) & self.mask
            self.since = getattr(self, "since", np.zeros((self.M, self.E), int)) + 1
            back = ~self.mask & (self.pot < 0) & (self.since > self.extra)
            new |= back
            self.since[new != self.mask] = 0
        elif self.rule in ("re1b", "re1zb"):  # like re1 / re1z, the dwell doubling per re-admission
            z = self.z if self.rule == "re1zb" else 0.0
            n_eff = (1 + self.decay) / (1 - self.decay)
            se = np.sqrt(np.maximum(self.sq - ema**2, 0.0) / n_eff)
            new = ~(ema - z * se > 0) & self.mask
            self.since = getattr(self, "since", np.zeros((self.M, self.E), int)) + 1
            self.back_count = getattr(self, "back_count", np.zeros((self.M, self.E), int))
            back = ~self.mask & (self.pot < 0) & (self.since > self.extra * 2.0**self.back_count)
            self.back_count += back
            new |= back
            self.since[new != self.mask] = 0
        elif self.rule == "re2":  # re-admit when the potential beats the best active expert's realized help
            new = (ema < 0) & self.mask
            best = np.min(np.where(new, ema, 0.0), 1, keepdims=True)
            back = ~self.mask & (self.pot < 0) & (self.pot < self.extra * best)
            new |= back
        else:
            raise SystemExit(self.rule)
        if getattr(self, "n", 0) < self.warm:
            new[:, self.big] = False
        self.mask[:] = new
        self.history.append(new[:, 0].mean())


class HG:
    """Soft routing by held-out hypergradients: every expert of every module moves by m x its
    Adam step, and every K steps m <- clip(m exp(-BETA cos(g_val, window movement)), LO, HI):
    a held-out slope that still falls along an expert's movement speeds it up, a rising one
    slows it down (per-expert learning rates learned on the held-out batch)."""

    def __init__(self, model, opt, inst, every, beta, lo, hi):
        self.model, self.opt, self.inst, self.every, self.beta, self.lo, self.hi = model, opt, inst, every, beta, lo, hi
        self.M, self.E = len(opt.module_names), len(opt.expert_names)
        orders = sorted({t.order for p in model.parameters() if (t := expert_tag(p)) is not None})
        self.where = [(p, orders.index(t.order), t.expert) for g in opt.param_groups for p in g["params"]
                      if (t := expert_tag(p)) is not None]
        self.params = [w[0] for w in self.where]
        self.mult = np.ones((self.M, self.E))
        self.mask = np.ones((self.M, self.E), bool)
        self.snap = [p.detach().clone() for p in self.params]
        self.trace = []
        step = opt.step

        def scaled_step(*a, **k):
            before = [p.detach().clone() for p in self.params]
            out = step(*a, **k)
            with torch.no_grad():
                for (p, m, e), b in zip(self.where, before):
                    if self.mult[m, e] != 1.0:
                        p.copy_(b + self.mult[m, e] * (p - b))
            return out

        opt.step = scaled_step

    def __call__(self, step):
        if step % self.every:
            return
        was_training = self.model.training
        with torch.enable_grad():
            loss = self.inst.loss(self.model, self.inst.heldout)
            gv = torch.autograd.grad(loss, self.params, allow_unused=True)
        h, ng, nd = (np.zeros((self.M, self.E)) for _ in range(3))
        for (p, m, e), s, g in zip(self.where, self.snap, gv):
            if g is None:
                continue
            d = p.detach() - s
            h[m, e] += float((g * d).sum())
            ng[m, e] += float((g * g).sum())
            nd[m, e] += float((d * d).sum())
        cos = h / np.maximum(np.sqrt(ng * nd), 1e-30)
        self.mult = np.clip(self.mult * np.exp(-self.beta * cos), self.lo, self.hi)
        self.mask = self.mult > 0.5
        self.trace.append(self.mult.copy())
        self.snap = [p.detach().clone() for p in self.params]
        self.model.train(was_training)


def keep_if_lower(model, inst, tensors, values, base):
    """A shrink trial: `values` written into `tensors` and kept if the held-out loss falls below
    `base`, else the tensors restored. Returns (the held-out loss now, kept)."""
    saved = [t.detach().clone() for t in tensors]
    for t, v in zip(tensors, values):
        t.copy_(v)
    trial = float(inst.loss(model, inst.heldout))
    if trial < base:
        return trial, True
    for t, v in zip(tensors, saved):
        t.copy_(v)
    return base, False


class Shrink:
    """Held-out shrinkage of each expert's accumulated update: every K steps, for each expert
    index e (all modules together), the held-out loss with e's update since the start shrunk is
    measured exactly (one forward); if lower, the shrunk update is kept. The dense weight (and
    bias) scaled by 1 - DELTA about their start, a LoRA pair's B about zero (an L2 pull towards
    the starting point whose strength the held-out batch chooses, per expert); `spectral`
    (spec sshrink): a LoRA product's singular values soft-thresholded by DELTA x its largest
    instead (molf.heldout.spectral_shrink_b), and the dense expert left alone unless MODE is
    softd; MODE softm: one trial per module, softr: up to 3 kept trials in a row."""

    def __init__(self, model, opt, inst, every, delta, spectral=False, mode="soft"):
        from molf.wrap import routed_modules
        self.model, self.inst, self.every, self.delta, self.mode = model, inst, every, delta, mode
        self.E = len(opt.expert_names)
        self.scaled = [[] for _ in range(self.E)]  # (tensor, its origin; None: zero)
        self.pairs = [[] for _ in range(self.E)]  # spectral: (A, B)
        for _, layer in routed_modules(model):
            for e, params in enumerate(layer.experts()):
                if layer.fft and e == 0:
                    if not spectral or mode == "softd":
                        self.scaled[e] += [(p, p.detach().clone()) for p in params]
                elif spectral:
                    self.pairs[e].append(params)
                else:
                    self.scaled[e].append((params[1], None))
        self.mask = np.ones((len(opt.module_names), self.E), bool)
        self.shrinks = np.zeros(self.E, int)

    def __call__(self, step):
        from molf.heldout import spectral_shrink_b
        if step % self.every:
            return
        was = self.model.training
        self.model.eval()
        keep = 1 - self.delta
        with torch.no_grad():
            base = float(self.inst.loss(self.model, self.inst.heldout))
            for e in range(self.E):
                if self.scaled[e]:
                    values = [keep * p if o is None else o + keep * (p - o) for p, o in self.scaled[e]]
                    base, kept = keep_if_lower(self.model, self.inst, [p for p, _ in self.scaled[e]], values, base)
                    self.shrinks[e] += kept
                for pairs in [[pair] for pair in self.pairs[e]] if self.mode == "softm" else [self.pairs[e]]:
                    for _ in range(3 if self.mode == "softr" else 1):
                        if not pairs:
                            break
                        values = [spectral_shrink_b(b.double(), a.double(), self.delta).to(b.dtype) for a, b in pairs]
                        base, kept = keep_if_lower(self.model, self.inst, [b for _, b in pairs], values, base)
                        self.shrinks[e] += kept
                        if not kept:
                            break
        self.model.train(was)


class ABRatio:
    """Spec abr:K:BETA (chained): every K steps, per module and LoRA expert, the cosines of A's and
    B's window movement with the held-out gradient move r = log(c_A) = -log(c_B) (A's and B's step
    multipliers, product 1) by BETA x (cos_B - cos_A): step size shifts to the factor whose movement
    lowered the held-out loss more. |r| <= log(s) / 2, so B's step over A's (in scale-1 terms)
    stays within [1, s^2] (s: the expert's scale; rsLoRA's s alone is r = 0)."""

    def __init__(self, model, opt, inst, every, beta):
        from molf.wrap import routed_modules
        self.model, self.inst, self.every, self.beta = model, inst, every, beta
        self.units = []  # (A, B, clip)
        for _, layer in routed_modules(model):
            for e, params in enumerate(layer.experts()):
                if not (layer.fft and e == 0):
                    self.units.append((params[0], params[1], 0.5 * float(np.log(layer.scales[e - int(layer.fft)]))))
        self.r = np.zeros(len(self.units))
        self.params = [t for a, b, _ in self.units for t in (a, b)]
        self.snap = [t.detach().clone() for t in self.params]
        step = opt.step

        def scaled_step(*a, **k):
            before = [t.detach().clone() for t in self.params]
            out = step(*a, **k)
            with torch.no_grad():
                for i, (ta, tb, _) in enumerate(self.units):
                    if self.r[i]:
                        for t, o, c in ((ta, before[2 * i], np.exp(self.r[i])), (tb, before[2 * i + 1], np.exp(-self.r[i]))):
                            t.copy_(o + float(c) * (t - o))
            return out

        opt.step = scaled_step

    def __call__(self, step):
        if step % self.every:
            return
        with torch.enable_grad():
            loss = self.inst.loss(self.model, self.inst.heldout)
            gv = torch.autograd.grad(loss, self.params, allow_unused=True)

        def cos(g, t, s):
            if g is None:
                return 0.0
            d = t.detach() - s
            return float((g * d).sum() / max(float(g.norm() * d.norm()), 1e-30))

        for i, (_, _, lim) in enumerate(self.units):
            ca = cos(gv[2 * i], self.params[2 * i], self.snap[2 * i])
            cb = cos(gv[2 * i + 1], self.params[2 * i + 1], self.snap[2 * i + 1])
            self.r[i] = float(np.clip(self.r[i] + self.beta * (cb - ca), -lim, lim))
        self.snap = [t.detach().clone() for t in self.params]


class Chain:
    """Hooks run in order after every step (spec A+B); the last one's routing state is reported."""

    def __init__(self, hooks):
        self.hooks = hooks
        for h in hooks:
            for k in ("mask", "mult", "shrinks", "undos", "r"):
                if hasattr(h, k):
                    setattr(self, k, getattr(h, k))

    def __call__(self, step):
        for h in self.hooks:
            h(step)


def make_method(spec):
    if "+" in spec:  # hooks chained: the first spec builds the model and optimizer
        first, *rest = spec.split("+")
        prefix = "E/" if first.startswith("E/") else ""
        builders = [make_method(first)] + [make_method(prefix + s) for s in rest]

        def chained(model, lr, steps, targets, log_path, inst):
            model, opt, hook = builders[0](model, lr, steps, targets, log_path, inst)
            hooks = [b.attach(model, opt, inst) for b in builders[1:]] + [hook]
            return model, opt, Chain(hooks)

        return chained
    if spec.startswith("ada:"):  # ada:INIT:TARGET[:noprune]
        _, init_r, target_r, *flags = spec.split(":")
        return q.adalora_method(int(init_r), int(target_r), allocate="noprune" not in flags)
    efficient = spec.startswith("E/")
    name, *args = spec.removeprefix("E/").split(":")
    ranks = q.EFFICIENT_RANKS if efficient else (q.LORA_RANK,)
    scale, given = os.environ.get("LORA_SCALE"), os.environ.get("LORA_ALPHAS")
    if scale and given:
        raise SystemExit("LORA_SCALE and LORA_ALPHAS: set one")
    # quality.py's scales unless told: rsLoRA alpha = r beside a dense expert, alpha / r = 1 for E/
    rslora = bool(given) or (not scale and not efficient)
    if scale:  # alpha / r = c
        alphas = tuple(float(r) * float(scale) for r in ranks)
    else:  # alpha = r, or the given rsLoRA alphas
        alphas = tuple(map(float, given.split(","))) if given else tuple(float(r) for r in ranks)

    def build(model, lr, steps, targets, log_path, inst):
        cfg = molf.MoLFConfig(ranks=ranks, alphas=alphas, fft=not efficient, rslora=rslora,
                              target_modules=targets, exclude_modules=())
        molf.wrap(model, cfg)
        opt = molf.MoLFAdamW(model, lr=lr, lora_lr=lr * float(os.environ.get("LORA_X", "1")), weight_decay=0.0, lora_weight_decay=0.0, routing=molf.TopK(k=2))
        if name == "both":
            return model, opt, q._none
        if name == "only":  # one expert everywhere, for counterfactuals: only:E
            mask = np.zeros((len(opt.module_names), len(opt.expert_names)), bool)
            mask[:, int(args[0])] = True
            opt._router = Fixed(opt._router, mask)
            return model, opt, q._none
        if name == "shrink":  # shrink:K:DELTA
            return model, opt, Shrink(model, opt, inst, int(args[0]), float(args[1]))
        if name == "hg":  # hg:K:BETA:LO:HI
            return model, opt, HG(model, opt, inst, int(args[0]), float(args[1]), float(args[2]), float(args[3]))
        every, decay = int(args[0]), float(args[1])
        rule = args[2] if len(args) > 2 else "drop"
        extra = float(args[3]) if len(args) > 3 else 0.0
        hook = LCA(model, opt, inst, every, decay, rule, extra)
        hook.z = float(args[4]) if len(args) > 4 else 0.0
        return model, opt, hook

    def attach(model, opt, inst):  # a shrink hook on another spec's model (spec A+shrink:K:D)
        if name == "sshrink":  # sshrink:K:TAU[:MODE]
            return Shrink(model, opt, inst, int(args[0]), float(args[1]), True, *(args[2:3]))
        if name == "abr":  # abr:K:BETA
            return ABRatio(model, opt, inst, int(args[0]), float(args[1]))
        if name != "shrink":
            raise SystemExit(f"only shrink chains after another spec, not {name}")
        return Shrink(model, opt, inst, int(args[0]), float(args[1]))

    build.attach = attach
    return build


def run(spec, regime, scale, seeds):
    rs = q.REGIMES[regime]
    steps = scale.steps_synthetic if rs.family == "synthetic" else scale.steps_lm
    build = make_method(spec)
    results = {}

    def train(inst, lr, seed, split):
        import copy, time
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, opt, hook = build(copy.deepcopy(inst.model), lr, steps, inst.targets, None, inst)
            g = torch.Generator().manual_seed(seed + 1)
            model.train()
            for step in range(1, steps + 1):
                inst.loss(model, inst.batch(step, steps, g)).backward()
                opt.step()
                hook(step)
                opt.zero_grad()
            model.eval()
            share = float(np.mean(hook.mask[:, 0])) if hasattr(hook, "mask") else 1.0
            if hasattr(hook, "shrinks"):  # held-out shrinkage: how often each expert was shrunk
                share = float(hook.shrinks[0])
                if os.environ.get("SHOW_SHRINKS"):
                    print(f"      {split} seed {seed} lr {lr:g}: kept trials per expert {hook.shrinks.tolist()}", flush=True)
            if hasattr(hook, "r"):  # abr: the modules' mean log step ratio and its spread
                print(f"      {split} seed {seed} lr {lr:g}: log c_A mean {np.mean(hook.r):+.3f} "
                      f"min {np.min(hook.r):+.3f} max {np.max(hook.r):+.3f}", flush=True)
            if hasattr(hook, "mult"):  # soft routing: the dense expert's mean multiplier / LoRA's
                share = float(np.mean(hook.mult[:, 0]) / max(np.mean(hook.mult[:, 1:]), 1e-30))
            return inst.evaluate(model, split), share, getattr(hook, "undos", 0)

    device = os.environ.get("DEVICE", "cpu")
    val_inst = rs.build(q.VAL_SEED, scale, device)
    lrs = [float(os.environ["LR"])] if os.environ.get("LR") else scale.lrs  # env LR: no selection
    if os.environ.get("NO_VAL") and len(lrs) == 1:  # env NO_VAL=1 with LR: test seeds only
        outs = [train(rs.build(s, scale, device), lrs[0], s, "test") for s in seeds]
        return lrs[0], [o[0] for o in outs], [o[1] for o in outs]
    val = {lr: train(val_inst, lr, q.VAL_SEED, "val") for lr in lrs}
    print(f"    val by lr: {' '.join(f'{k:g}:{v[0]:.4f} (undone {v[2]})' for k, v in val.items())}", flush=True)
    val = {k: v[0] for k, v in val.items()}
    if os.environ.get("VAL_ONLY"):  # the validation instance only (slow scales)
        return lrs[0], [val[lrs[0]]], [1.0]
    best = lrs[0]
    for lr in lrs[1:]:
        best = lr if q._better(val[lr], val[best], rs.higher_is_better) else best
    outs = [train(rs.build(s, scale, device), best, s, "test") for s in seeds]
    if os.environ.get("REVERT"):
        print(f"    undone (module, expert) windows per run: {statistics.fmean(o[2] for o in outs):.1f}", flush=True)
    return best, [o[0] for o in outs], [o[1] for o in outs]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("specs", nargs="+")
    ap.add_argument("--regimes", nargs="+", default=list(q.REGIMES))
    ap.add_argument("--baseline", default="benches/results/quality-quick/results.json")
    ap.add_argument("--json")
    ap.add_argument("--full", action="store_true", help="quality.py's full scale (seeds 0-4)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = json.load(open(args.baseline))["regimes"]
    scale = q.FULL if args.full else q.QUICK
    if os.environ.get("CACHE"):  # where the pre-trained LM is cached
        from dataclasses import replace
        scale = replace(scale, cache_dir=os.environ["CACHE"])
    first, _, last = os.environ.get("SEEDS", f"0-{scale.seeds - 1}").partition("-")  # env SEEDS=a-b
    seeds = list(range(int(first), int(last or first) + 1))
    out = {}
    for regime in args.regimes:
        b = base[regime]
        hib = b["higher_is_better"]
        means = {m: b["methods"][m]["test"]["mean"] for m in ("FFT", "LoRA", "AdaLoRA", "MoLF-E")}
        best = max(means["FFT"], means["LoRA"]) if hib else min(means["FFT"], means["LoRA"])
        print(f"== {regime}: FFT {means['FFT']:.4f} LoRA {means['LoRA']:.4f} AdaLoRA {means['AdaLoRA']:.4f}", flush=True)
        for spec in args.specs:
            lr, vals, shares = run(spec, regime, scale, seeds)
            m = statistics.fmean(vals)
            gap = q._gap(m, best, hib)
            ada = q._gap(m, means["AdaLoRA"], hib)
            print(f"  {spec:28s} lr {lr:g}  {m:.4f}  gap {gap:+.1%}  vs AdaLoRA {ada:+.1%}  share0 {np.mean(shares):.2f}"
                  f"  seeds {' '.join(f'{v:.3f}' for v in vals)}", flush=True)
            out.setdefault(regime, {})[spec] = {"lr": lr, "vals": vals, "gap": gap, "seeds": seeds}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
