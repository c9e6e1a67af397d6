/**
 * Learning rate per optimizer step: linear warmup, then a cosine decay (BLIP-2's schedule), or a
 * constant rate.
 *
 * BLIP-2 trains with LAVIS's `LinearWarmupCosineLRScheduler` (lavis/common/optims.py), which the
 * runner calls before every iteration with (epoch, iteration within the epoch):
 *   - epoch 0: lr = min(lr, warmupLr + (lr - warmupLr) * step / warmupSteps), per iteration, so
 *     warmup must fit in the first epoch; whatever is left of epoch 0 after warmup runs at `lr`;
 *   - epoch e >= 1: lr = minLr + (lr - minLr) * (1 + cos(pi * e / maxEpoch)) / 2, one value for
 *     the whole epoch: a staircase of maxEpoch steps that never reaches minLr (the last epoch is
 *     maxEpoch - 1).
 * Ours is the same warmup, followed by the same cosine evaluated per *step*, starting where warmup
 * ends and reaching minLr at `totalSteps`:
 *   - step < warmupSteps: warmupLr + (lr - warmupLr) * step / warmupSteps   (step 0 is warmupLr);
 *   - step >= warmupSteps: minLr + (lr - minLr) * (1 + cos(pi * p)) / 2 with
 *     p = (step - warmupSteps) / (totalSteps - warmupSteps), clamped to [0, 1] (so steps at or past
 *     `totalSteps` run at minLr; the last trained step, totalSteps - 1, is just above it).
 * Why: our trainer counts steps, not epochs. Fine-tuning sets are often small (a few hundred
 * examples, so one epoch is shorter than LAVIS's 2000–5000 warmup steps, which LAVIS's warmup would
 * cut short) or a single large pass (one epoch, where LAVIS's cosine would never start). A per-step
 * curve behaves the same whatever the epoch size; with LAVIS's own settings (10 long epochs) it is
 * the smooth version of LAVIS's staircase, without the flat rest of epoch 0.
 */
import { Blip2Error } from "../errors.js";

/** Warmup then cosine decay, as BLIP-2 (see the module comment for how it differs from LAVIS). */
export interface CosineSchedule {
  kind?: "cosine";
  /** Peak rate, reached at the end of warmup (LAVIS `init_lr`). */
  lr: number;
  /** Rate at `totalSteps` (LAVIS `min_lr`). */
  minLr: number;
  /** Rate at step 0 (LAVIS `warmup_lr`). */
  warmupLr: number;
  warmupSteps: number;
  totalSteps: number;
}

/** One rate throughout, optionally after a linear warmup from `warmupLr`. */
export interface ConstantSchedule {
  kind: "constant";
  lr: number;
  warmupLr?: number;
  warmupSteps?: number;
}

export type LrSchedule = CosineSchedule | ConstantSchedule;

/** LAVIS's BLIP-2 stage 1 settings (projects/blip2/train/pretrain_stage1.yaml). */
export const LAVIS_STAGE1 = { lr: 1e-4, minLr: 1e-5, warmupLr: 1e-6, warmupSteps: 5000 } as const;
/** LAVIS's BLIP-2 stage 2 settings (projects/blip2/train/pretrain_stage2.yaml). */
export const LAVIS_STAGE2 = { lr: 1e-4, minLr: 1e-5, warmupLr: 1e-6, warmupSteps: 2000 } as const;

/** The learning rate for optimizer step `step` (0-based: the first step is 0). */
export function lrAt(step: number, schedule: LrSchedule): number {
  checkSchedule(schedule);
  if (!Number.isInteger(step) || step < 0) throw new Blip2Error(`learning-rate schedule: step must be an integer >= 0, got ${step}`);
  const warmupSteps = schedule.warmupSteps ?? 0;
  if (step < warmupSteps) {
    const warmupLr = schedule.warmupLr ?? schedule.lr;
    return warmupLr + ((schedule.lr - warmupLr) * step) / warmupSteps;
  }
  if (schedule.kind === "constant") return schedule.lr;
  const { lr, minLr, totalSteps } = schedule;
  const decaySteps = totalSteps - warmupSteps;
  const progress = decaySteps === 0 ? 1 : Math.min(1, (step - warmupSteps) / decaySteps);
  return minLr + (lr - minLr) * 0.5 * (1 + Math.cos(Math.PI * progress));
}

/** Throws a Blip2Error naming the first unusable setting (they come from the command line). */
export function checkSchedule(schedule: LrSchedule): void {
  const rate = (name: string, v: unknown) => {
    if (typeof v !== "number" || !Number.isFinite(v) || v < 0) {
      throw new Blip2Error(`learning-rate schedule: ${name} must be a finite number >= 0, got ${v}`);
    }
  };
  const count = (name: string, v: unknown) => {
    if (!Number.isSafeInteger(v) || (v as number) < 0) {
      throw new Blip2Error(`learning-rate schedule: ${name} must be an integer >= 0, got ${v}`);
    }
  };
  rate("lr", schedule.lr);
  if (schedule.warmupLr !== undefined) rate("warmupLr", schedule.warmupLr);
  if (schedule.warmupSteps !== undefined) count("warmupSteps", schedule.warmupSteps);
  if (schedule.kind === "constant") return;
  if (schedule.kind !== undefined && schedule.kind !== "cosine") {
    throw new Blip2Error(`learning-rate schedule: unknown kind ${JSON.stringify(schedule.kind)} (expected "cosine" or "constant")`);
  }
  rate("minLr", schedule.minLr);
  rate("warmupLr", schedule.warmupLr);
  count("warmupSteps", schedule.warmupSteps);
  count("totalSteps", schedule.totalSteps);
  if (schedule.warmupSteps > schedule.totalSteps) {
    throw new Blip2Error(`learning-rate schedule: warmupSteps (${schedule.warmupSteps}) exceeds totalSteps (${schedule.totalSteps})`);
  }
}
