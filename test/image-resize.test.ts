/**
 * Byte-for-byte parity of `resize` with Pillow's `Image.resize((w, h), resample)`.
 *
 * The hashes are the first 16 hex digits of the SHA-256 of the bytes Pillow 12.3 produced, for
 * a synthetic image (regenerated here from the same formula) and for fixture photos, with every
 * filter: downscale, upscale, one axis only, mixed, 1x1 and extreme aspect ratios.
 */
import { createHash } from "node:crypto";
import { describe, expect, it } from "vitest";
import { loadImage, type RgbImage } from "../src/image/decode.js";
import { RESAMPLING_NAMES, resize } from "../src/image/resize.js";
import { fixture } from "./helpers.js";

const SYNTH_HASHES: Record<number, string[]> = {
  0: ["5b242ec10b5923b2", "43696e0174bab6bd", "e57432e9a9127557", "56c5d20e3b452766", "495a624f2bd8a325", "885368ba4a646dcb", "dc2aa706b5c70c5e", "8aa647b300f30392"],
  1: ["e81668a80488d338", "5e44617de162d6f2", "c5924a4a61267052", "fee23754cfb44bf1", "2c03a2ee8fc0fb89", "fe517f7870528680", "f7934ccc0f586c0a", "73d6caba96f719ae"],
  2: ["bcdde2612c2e43eb", "8bc77e2d7125cc64", "92252d59031e1151", "ac37f51d894c52c2", "ed49fe96b85314aa", "d732297babadbbda", "69dbc16e952f9267", "a8a6c96e06437322"],
  3: ["ae638ad2f64bf036", "0f3bb79497548e4d", "b2999c623b37bfa0", "963a85ebbc1812bc", "fe98b9581e98cd59", "fe517f7870528680", "8ab03426e6bad9bf", "a1f065bd51289f04"],
  4: ["15791ce0023de554", "43696e0174bab6bd", "56088fa07c72c96f", "4cde6cf63ed2a51f", "1cb32c3868a81fb0", "fe517f7870528680", "2bca730f9eb0fd7c", "eef92bb40cfd1b86"],
  5: ["75fdec2684e3e5c2", "100cf780fb1df9fc", "fb61606866f751c4", "85e6c9e539efb071", "e0cffb9d9a933ab3", "d732297babadbbda", "e2e116ff8941260a", "6f20496d4c7fe320"],
};

const FIXTURE_HASHES: Record<string, string[]> = {
  "photo640x427.jpg@224x224": ["145897164253c36f", "bdd92707ba50e4d2", "eb463c7650ae4623", "55ad86fefa8587fa", "c3c35d048d5fef59", "3f841bec158605db"],
  "photo640x427.jpg@384x384": ["3cc46e64ea0e20fd", "eae22e91092f29e2", "e4eaa3608e142537", "e44aea85ff6f1a41", "95966ef0e305a459", "407e9060c6e291f2"],
  "photo640x427.jpg@37x500": ["fd0419ccad1344cd", "af0e534ce08a1902", "1b006938a8ed4d34", "3a4a15a5ee798c2d", "678e847c386bf921", "f0b14b750669089b"],
  "rgba150x200.png@224x224": ["85cdbe579417e18e", "dafc24bd49ba8ec0", "04f7725b673f895c", "530331051da8869b", "85cdbe579417e18e", "19d79adcd38c2739"],
  "tiny13x9.png@224x224": ["692b158fcde11cab", "8a3b6a4dd9d41066", "5a1128dd1eca5f5a", "8424a216d99a9fe9", "692b158fcde11cab", "91617022784ce7a4"],
  "gray300x100.png@31x7": ["af500ff3146a6668", "fef6565e76f67a88", "df902e6c431a2a33", "74381dc05f59565c", "3f49911803312f2e", "e1b59f53d2f8a969"],
};

/** Target sizes (width, height) of SYNTH_HASHES, in order, for a 97x61 source. */
const SYNTH_SIZES: [number, number][] = [
  [30, 30],
  [224, 224],
  [97, 20],
  [40, 61],
  [150, 33],
  [1, 1],
  [3, 200],
  [96, 62],
];

/**
 * 97x61 test image: 4x4 checkerboard of LCG noise (exercises overshoot and clipping of the
 * filters with negative lobes) and smooth ramps.
 */
function synthImage(w: number, h: number): RgbImage {
  let s = 12345;
  const data = new Uint8Array(w * h * 3);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      for (let c = 0; c < 3; c++) {
        s = (Math.imul(s, 1103515245) + 12345) & 0x7fffffff;
        data[(y * w + x) * 3 + c] = ((x >> 2) + (y >> 2)) & 1 ? (s >> 16) & 255 : (x * 5 + y * 3 + c * 40) & 255;
      }
    }
  }
  return { data, width: w, height: h };
}

const sha16 = (data: Uint8Array): string => createHash("sha256").update(data).digest("hex").slice(0, 16);

describe("resize matches Pillow byte for byte", () => {
  const src = synthImage(97, 61);
  for (let filter = 0; filter < 6; filter++) {
    it(`synthetic 97x61, ${RESAMPLING_NAMES[filter]}`, () => {
      const got = SYNTH_SIZES.map(([w, h]) => {
        const out = resize(src, w, h, filter);
        expect([out.width, out.height, out.data.length]).toEqual([w, h, w * h * 3]);
        return sha16(out.data);
      });
      expect(got).toEqual(SYNTH_HASHES[filter]);
    });
  }

  for (const [key, hashes] of Object.entries(FIXTURE_HASHES)) {
    it(`${key}, all filters`, async () => {
      const [name, size] = key.split("@") as [string, string];
      const [w, h] = size.split("x").map(Number) as [number, number];
      const img = await loadImage(fixture(name));
      const got = [0, 1, 2, 3, 4, 5].map((filter) => sha16(resize(img, w, h, filter).data));
      expect(got).toEqual(hashes);
    });
  }
});

describe("resize basics", () => {
  it("keeps a constant image constant, up and down, for every filter", () => {
    const w = 37;
    const h = 23;
    const src = { data: new Uint8Array(w * h * 3), width: w, height: h };
    for (let i = 0; i < w * h; i++) src.data.set([200, 17, 99], i * 3);
    for (let filter = 0; filter < 6; filter++) {
      for (const [ow, oh] of [[5, 3], [100, 64], [37, 80], [8, 23], [1, 1]] as [number, number][]) {
        const out = resize(src, ow, oh, filter);
        expect([out.width, out.height]).toEqual([ow, oh]);
        const distinct = new Set<string>();
        for (let i = 0; i < ow * oh; i++) distinct.add(`${out.data[i * 3]},${out.data[i * 3 + 1]},${out.data[i * 3 + 2]}`);
        expect([...distinct], `${RESAMPLING_NAMES[filter]} ${ow}x${oh}`).toEqual(["200,17,99"]);
      }
    }
  });

  it("returns an equal copy for a same-size resize", () => {
    const src = synthImage(9, 4);
    const out = resize(src, 9, 4, 3);
    expect(out.data).not.toBe(src.data);
    expect(Array.from(out.data)).toEqual(Array.from(src.data));
  });

  it("NEAREST picks Pillow's source pixels", () => {
    // 4x1 → 2x1: Pillow samples x = floor(0.5 * 2 + k * 2) = 1, 3. 1x1 → 3x1 repeats the pixel.
    const src = { data: Uint8Array.from([0, 0, 0, 10, 10, 10, 20, 20, 20, 30, 30, 30]), width: 4, height: 1 };
    expect(Array.from(resize(src, 2, 1, 0).data)).toEqual([10, 10, 10, 30, 30, 30]);
    const one = { data: Uint8Array.from([1, 2, 3]), width: 1, height: 1 };
    expect(Array.from(resize(one, 3, 1, 0).data)).toEqual([1, 2, 3, 1, 2, 3, 1, 2, 3]);
  });

  it("BILINEAR halving uses the widened tent and Pillow's edge handling", () => {
    // 4x1 → 2x1: scale 2, so the tent spans 2 px each side of the centre. Output 0 (centre 1.0)
    // reads x = 0, 1, 2 at distances 0.25, 0.25, 0.75 (in scaled units): weights 3/7, 3/7, 1/7
    // → (0*3 + 10*3 + 20)/7 = 7.14 → 7. Output 1 (centre 3.0) reads x = 1, 2, 3 with 1/7, 3/7,
    // 3/7 → (10 + 60 + 90)/7 = 22.9 → 23. (Pillow 12.3 gives the same.)
    const src = { data: Uint8Array.from([0, 0, 0, 10, 10, 10, 20, 20, 20, 30, 30, 30]), width: 4, height: 1 };
    expect(Array.from(resize(src, 2, 1, 2).data)).toEqual([7, 7, 7, 23, 23, 23]);
  });

  it("rejects bad sizes and filters", () => {
    const src = synthImage(4, 4);
    expect(() => resize(src, 0, 4, 3)).toThrow(/positive integers/);
    expect(() => resize(src, 4, 2.5, 3)).toThrow(/positive integers/);
    expect(() => resize(src, 8, 8, 7)).toThrow(/unsupported resample filter 7/);
  });
});
