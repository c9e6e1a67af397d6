/**
 * Decoding parity with Pillow's `Image.open(f).convert("RGB")` for the formats and modes that
 * need care: BMP and GIF (decoded by our own readers), 16-bit greyscale, CMYK, palette with
 * transparency, grey+alpha, lossy WebP, TIFF, a JPEG with an EXIF rotation (not applied) and a
 * PNG with a non-sRGB ICC profile (not colour-managed).
 *
 * Each sample is a tiny file written by Pillow 12.3; `sha` is the first 16 hex digits of the
 * SHA-256 of the RGB bytes Pillow decoded from it.
 */
import { createHash } from "node:crypto";
import sharp from "sharp";
import { describe, expect, it } from "vitest";
import { loadImage } from "../src/image/decode.js";

interface Sample {
  name: string;
  /** The mode Pillow opened the file in, before convert("RGB"). */
  pillowMode: string;
  width: number;
  height: number;
  sha: string;
  b64: string;
}

const SAMPLES: Sample[] = [
  {
    name: "24-bit BMP",
    pillowMode: "RGB",
    width: 13,
    height: 7,
    sha: "85c44abb36394d02",
    b64:
      "Qk1OAQAAAAAAADYAAAAoAAAADQAAAAcAAAABABgAAAAAABgBAADEDgAAxA4AAAAAAAAAAAAAAN4AQt4ThN4mxt45CN5MSt5f" +
      "jN5yzt6FEN6YUt6rlN6+1t7RGN7kAAC5ADe5E265JqW5Ody5TBO5X0q5coG5hbi5mO+5qya5vl250ZS55AAAlAAslBNYlCaE" +
      "lDmwlEzclF8IlHI0lIVglJiMlKu4lL7klNEQlOQAAG8AIW8TQm8mY285hG9MpW9fxm9y52+FCG+YKW+rSm++a2/RjG/kAABK" +
      "ABZKEyxKJkJKOVhKTG5KX4RKcppKhbBKmMZKq9xKvvJK0QhK5AAAJQALJRMWJSYhJTksJUw3JV9CJXJNJYVYJZhjJatuJb55" +
      "JdGEJeQAAAAAAAATAAAmAAA5AABMAABfAAByAACFAACYAACrAAC+AADRAADkAA==",
  },
  {
    name: "32-bit BMP",
    pillowMode: "RGB",
    width: 13,
    height: 7,
    sha: "85c44abb36394d02",
    b64:
      "Qk2iAQAAAAAAADYAAAAoAAAADQAAAAcAAAABACAAAAAAAGwBAADEDgAAxA4AAAAAAAAAAAAAAN4AAELeEyiE3iZQxt45eAje" +
      "TKBK3l/IjN5y8M7ehRgQ3phAUt6raJTevpDW3tG4GN7k4AC5AAA3uRMobrkmUKW5OXjcuUygE7lfyEq5cvCBuYUYuLmYQO+5" +
      "q2gmub6QXbnRuJS55OAAlAAALJQTKFiUJlCElDl4sJRMoNyUX8gIlHLwNJSFGGCUmECMlKtouJS+kOSU0bgQlOTgAG8AACFv" +
      "EyhCbyZQY285eIRvTKClb1/Ixm9y8OdvhRgIb5hAKW+raEpvvpBrb9G4jG/k4ABKAAAWShMoLEomUEJKOXhYSkygbkpfyIRK" +
      "cvCaSoUYsEqYQMZKq2jcSr6Q8krRuAhK5OAAJQAACyUTKBYlJlAhJTl4LCVMoDclX8hCJXLwTSWFGFglmEBjJatobiW+kHkl" +
      "0biEJeTgAAAAAAAAEygAACZQAAA5eAAATKAAAF/IAABy8AAAhRgAAJhAAACraAAAvpAAANG4AADk4A==",
  },
  {
    name: "8-bit palette BMP",
    pillowMode: "P",
    width: 13,
    height: 7,
    sha: "2ba2edae74934160",
    b64:
      "Qk1uAQAAAAAAAP4AAAAoAAAADQAAAAcAAAABAAgAAAAAAHAAAADEDgAAxA4AADIAAAAyAAAAtd7IAKC5ywAw0sQArd58ABDe" +
      "mACBuYUAzpTIAIyUqwAQlOQASpSPAAiUcgB8b9sASm++AClvqwDXb3wACG+YAKXeMACluTkAItJZACHeCgAcuQoAxpRWAISU" +
      "OQBYlCYAFpQKAJVvVgBjbzkAQm8mABFvCgDcSr4AfyXbAEgxxAClSo8AhEpyAE0lhQAAANsAAAC+AAAAqwAAAI8AAAByAFhK" +
      "TAAsSiYALCVMABYlJgALSgoABiUKAAAAVgAAADkAAAAmAAAACgATExAQEhIDAwQCAAACAAAAFBQXERUSCQUDBgICAQAAABgY" +
      "FxYVFQoJCQcGBggAAAAcHBsaGRkODg8NDAsLAAAALCwpKCgoISAgHR0dCAAAAC0tKyoqKiIiIh8eHh4AAAAxMTAvLi4nJiYl" +
      "JCMjAAAA",
  },
  {
    name: "4-bit palette BMP",
    pillowMode: "P",
    width: 13,
    height: 7,
    sha: "22b26b9f0d84f0f1",
    b64:
      "Qk3mAAAAAAAAAHYAAAAoAAAADQAAAAcAAAABAAgAAAAAAHAAAADEDgAAxA4AABAAAAAQAAAAqMjJADDSxAB9zIUAZ5SrAHJv" +
      "qwB0zEMAHswKAG6UMABTbzAAtzvJAEgxxAB0OIUAAACrADo4QwAIOAoAAAAwAAYGBQUGBQIAAQEAAAEAAAAGBgUFBQYCAgAA" +
      "AQEAAAAABgYHBwcCCAMDAwAAAQAAAA4ICAgHBwsJCgMEBAQAAAAODg0NDQsLCwkJCQkKAAAADg4ODQ0NDQsLCgoKCQAAAA8P" +
      "Dw8PDwwMDAwMDAwAAAA=",
  },
  {
    name: "1-bit BMP",
    pillowMode: "1",
    width: 13,
    height: 7,
    sha: "b17ff4392dfd27f1",
    b64:
      "Qk1aAAAAAAAAAD4AAAAoAAAADQAAAAcAAAABAAEAAAAAABwAAADEDgAAxA4AAAIAAAACAAAAAAAAAP///wB3eAAAqtgAACto" +
      "AABKWAAAKVAAAAKoAAAAAAAA",
  },
  {
    name: "GIF with a transparent index",
    pillowMode: "P",
    width: 13,
    height: 7,
    sha: "2cde7f3e17917dfa",
    b64:
      "R0lGODlhDQAHAIQAAMnIqMTSMIXMfauUZ8hvW4VvkjXIpVnSIgrMHjCUbjBvU8k7t8QxSIU4dMgAAIUAAENKTUMlJwo4CDAA" +
      "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAACH5BAEAAAIALAAAAAANAAcAAAhMACcIFPig4AMHCB1IkBCh" +
      "YcMGDRhIXLAQgkWIBQos2MhAgoKPCTIWIECSJAIECRIYMHBggEsAAAKcVMnygACYAQIAOLnygM2YOmMGBAA7",
  },
  {
    name: "interlaced animated GIF",
    pillowMode: "P",
    width: 13,
    height: 7,
    sha: "2cde7f3e17917dfa",
    b64:
      "R0lGODdhDQAHAIQAAMnIqMTSMIXMfauUZ8hvW4VvkjXIpVnSIgrMHjCUbjBvU8k7t8QxSIU4dMgAAIUAAENKTUMlJwo4CDAA" +
      "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAACwAAAAADQAHAAAITAAnCBT4oOADBwgdSJAQoWHDBg0YSFyw" +
      "EIJFiAUKLNjIQIKCjwkyFiBAkiQCBAkSGDBwYIBLAAACnFTJ8oAAmAECADi58oDNmDpjBgQAIfkEAQAAFAAsAAAAAA0ABwCE" +
      "4///49rvoO3kxrW945DOoJBaXv//XtqiJe3AS7VZS5Cb42u940atoFmI4yGcoCG1Y1ykVFI1JVmGSyGMAAAAAAAAAAAAAAAA" +
      "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAACE8AAQgEIKCggYMHEQRYGKCggAMQISZYOKDigAIJMmZEQKDjxQIgFYhUIIHAggUN" +
      "QEJYCSFCBAULGDBI+eBBA5cQJEhg4KBnzZsPJkyIMCEgADs=",
  },
  {
    name: "16-bit greyscale PNG",
    pillowMode: "I;16",
    width: 13,
    height: 7,
    sha: "8e5fd53884f9bc4a",
    b64:
      "iVBORw0KGgoAAAANSUhEUgAAAA0AAAAHEAAAAACmi0SFAAAAPklEQVR4nGNkYOCazj0dhpFZLAyJDIkMPxgTGaYzJjJMR2ax" +
      "MCSiC8FYLNjUQ1hQXdgkWXDZxJDIgikE4wEA/Awz481TKlEAAAAASUVORK5CYII=",
  },
  {
    name: "CMYK JPEG",
    pillowMode: "CMYK",
    width: 13,
    height: 7,
    sha: "6fb7d884f59299e7",
    b64:
      "/9j/7gAOQWRvYmUAZAAAAAAA/9sAQwACAQEBAQECAQEBAgICAgIEAwICAgIFBAQDBAYFBgYGBQYGBgcJCAYHCQcGBggLCAkK" +
      "CgoKCgYICwwLCgwJCgoK/8AAFAgABwANBEMRAE0RAFkRAEsRAP/EAB8AAAEFAQEBAQEBAAAAAAAAAAABAgMEBQYHCAkKC//E" +
      "ALUQAAIBAwMCBAMFBQQEAAABfQECAwAEEQUSITFBBhNRYQcicRQygZGhCCNCscEVUtHwJDNicoIJChYXGBkaJSYnKCkqNDU2" +
      "Nzg5OkNERUZHSElKU1RVVldYWVpjZGVmZ2hpanN0dXZ3eHl6g4SFhoeIiYqSk5SVlpeYmZqio6Slpqeoqaqys7S1tre4ubrC" +
      "w8TFxsfIycrS09TV1tfY2drh4uPk5ebn6Onq8fLz9PX29/j5+v/aAA4EQwBNAFkASwAAPwD4J/4JS/8AMN/4BVL/AIhkPB//" +
      "AEBNM/7+R/418b/sAfsOfs0al8Gvhz4x+KXwfT4geMviZqBt/Bngv+0UsI72OA25vrm4vnilS2ihS4iAGySSSSaJVTZ5ssP7" +
      "+V/RP+xf/wAkqT/gH8jR/wAQyHg//oCaZ/38j/xrpP2jPh/+yF4N+Cnw28c6N4I+EmjWfiL+0Ps/ivw74DksLLxF5cGnyN5S" +
      "anp+u3R8hrkxt5kGn/OzFftaFXiK/9k=",
  },
  {
    name: "palette PNG with tRNS",
    pillowMode: "P",
    width: 13,
    height: 7,
    sha: "2cde7f3e17917dfa",
    b64:
      "iVBORw0KGgoAAAANSUhEUgAAAA0AAAAHCAMAAADkrjcoAAAAPFBMVEXJyKjE0jCFzH2rlGfIb1uFb5I1yKVZ0iIKzB4wlG4w" +
      "b1PJO7fEMUiFOHTIAACFAABDSk1DJScKOAgwAAA/xUNjAAAAAnRSTlP/AOW3MEoAAABESURBVHicJcdZEoAgDAXBhxggm0a8" +
      "/11Nyv6awVvudCXs/RR3M9O8iHAnUlXDFhEmorNgLeYxZu8daHU588huyPunun3SFwM80Px5pAAAAABJRU5ErkJggg==",
  },
  {
    name: "LA PNG",
    pillowMode: "LA",
    width: 13,
    height: 7,
    sha: "b4843c32e0ba236d",
    b64:
      "iVBORw0KGgoAAAANSUhEUgAAAA0AAAAHCAQAAAB5eQ+RAAAAZUlEQVR4nGXGQQrCMAAF0aekiU2a7pqVIohC738tUXsEN0EF" +
      "Gf6f2RHXYY3r/4cmSZLY/SUsRofOb92FJhuNct9DMIiuQlNkRZE97Z0/HZpJMZm8nEy9kpuwmFXV5qiabYKLavMGApMN6dzx" +
      "iXkAAAAASUVORK5CYII=",
  },
  {
    name: "lossy WebP",
    pillowMode: "RGB",
    width: 13,
    height: 7,
    sha: "90317294b393d04c",
    b64:
      "UklGRm4AAABXRUJQVlA4IGIAAABQAgCdASoNAAcAAoBCJbACdLoAfhgDIIuewvAA/viV7u4s3O7UxlHixZQlkuNCI1sQ+5ew" +
      "TrHUSyjfVuVXXfpv82OvTWAEV/i//f1Fnv7m/624vZvN0rVMfoXy45PVGmAAAA==",
  },
  {
    name: "RGBA TIFF",
    pillowMode: "RGBA",
    width: 13,
    height: 7,
    sha: "85c44abb36394d02",
    b64:
      "SUkqAAgAAAALAAABBAABAAAADQAAAAEBBAABAAAABwAAAAIBAwAEAAAAkgAAAAMBAwABAAAAAQAAAAYBAwABAAAAAgAAABEB" +
      "BAABAAAAmgAAABUBAwABAAAABAAAABYBBAABAAAABwAAABcBBAABAAAAbAEAABwBAwABAAAAAQAAAFIBAwABAAAAAgAAAAAA" +
      "AAAIAAgACAAIAAAAAAATAAAoJgAAUDkAAHhMAACgXwAAyHIAAPCFAAAYmAAAQKsAAGi+AACQ0QAAuOQAAOAAJQAAEyULKCYl" +
      "FlA5JSF4TCUsoF8lN8hyJULwhSVNGJglWECrJWNoviVukNElebjkJYTgAEoAABNKFigmSixQOUpCeExKWKBfSm7IckqE8IVK" +
      "mhiYSrBAq0rGaL5K3JDRSvK45EoI4ABvAAATbyEoJm9CUDlvY3hMb4SgX2+lyHJvxvCFb+cYmG8IQKtvKWi+b0qQ0W9ruORv" +
      "jOAAlAAAE5QsKCaUWFA5lIR4TJSwoF+U3MhylAjwhZQ0GJiUYECrlIxovpS4kNGU5LjklBDgALkAABO5NygmuW5QObmleEy5" +
      "3KBfuRPIcrlK8IW5gRiYubhAq7nvaL65JpDRuV245LmU4ADeAAAT3kIoJt6EUDnexnhM3gigX95KyHLejPCF3s4YmN4QQKve" +
      "Umi+3pSQ0d7WuOTeGOA=",
  },
  {
    name: "JPEG with EXIF orientation 6",
    pillowMode: "RGB",
    width: 13,
    height: 7,
    sha: "972d569ca2ad3b76",
    b64:
      "/9j/4AAQSkZJRgABAQAAAQABAAD/4QAiRXhpZgAATU0AKgAAAAgAAQESAAMAAAABAAYAAAAAAAD/2wBDAAgGBgcGBQgHBwcJ" +
      "CQgKDBQNDAsLDBkSEw8UHRofHh0aHBwgJC4nICIsIxwcKDcpLDAxNDQ0Hyc5PTgyPC4zNDL/2wBDAQkJCQwLDBgNDRgyIRwh" +
      "MjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjL/wAARCAAHAA0DASIAAhEBAxEB/8QA" +
      "HwAAAQUBAQEBAQEAAAAAAAAAAAECAwQFBgcICQoL/8QAtRAAAgEDAwIEAwUFBAQAAAF9AQIDAAQRBRIhMUEGE1FhByJxFDKB" +
      "kaEII0KxwRVS0fAkM2JyggkKFhcYGRolJicoKSo0NTY3ODk6Q0RFRkdISUpTVFVWV1hZWmNkZWZnaGlqc3R1dnd4eXqDhIWG" +
      "h4iJipKTlJWWl5iZmqKjpKWmp6ipqrKztLW2t7i5usLDxMXGx8jJytLT1NXW19jZ2uHi4+Tl5ufo6erx8vP09fb3+Pn6/8QA" +
      "HwEAAwEBAQEBAQEBAQAAAAAAAAECAwQFBgcICQoL/8QAtREAAgECBAQDBAcFBAQAAQJ3AAECAxEEBSExBhJBUQdhcRMiMoEI" +
      "FEKRobHBCSMzUvAVYnLRChYkNOEl8RcYGRomJygpKjU2Nzg5OkNERUZHSElKU1RVVldYWVpjZGVmZ2hpanN0dXZ3eHl6goOE" +
      "hYaHiImKkpOUlZaXmJmaoqOkpaanqKmqsrO0tba3uLm6wsPExcbHyMnK0tPU1dbX2Nna4uPk5ebn6Onq8vP09fb3+Pn6/9oA" +
      "DAMBAAIRAxEAPwDF0n4fQbUJjVi3QZFdVb+AYBAp2RDPcDr/ADoor53G5hWp4duNtEun+D/5J/h535OHc3xbXxH/2Q==",
  },
  {
    name: "PNG with a Display P3 ICC profile (not colour-managed)",
    pillowMode: "RGB",
    width: 13,
    height: 7,
    sha: "5c27f01f8c63aab5",
    b64:
      "iVBORw0KGgoAAAANSUhEUgAAAA0AAAAHCAIAAABcElBNAAABP2lDQ1BpY2MAABiVfZC/SwJxGMY/l5V1WBA5Fhyh0FAQOdRS" +
      "gRcFQRFqoDadp2agctz3wuZqqiVqibamGiJoaGjSsTEIHCv8AxoKaujHxVcHLahneT88PC/vywPKY94siHYNCkXHjsyHtXgi" +
      "qXlrePDTTS+DhimsxehcDEAYJWE6dp4feq2iyHk3mjOK6a3amb23O/MWnL4+eApUL/hfajojTOADCJiW7YCiAUMlx5I8C/jN" +
      "nJEGJQ6M2PFEEpQd6a81+EhyqsHnku1YRAelAmhrLZxq4UJ+Q96Vkt/7MsWVKNAFDCBYJoT+R6azntHRGQPZ1+8eRDY03tjy" +
      "haHj3nVfguA9hM99130/cd2vJfAcQ8Xf3N9+gKmypKa3UIbLCVCvmt7wJPSpcLNpGbZRtzxAW3Ydnk+hJwH9t6CufgN5X15B" +
      "avQKkAAAAAlwSFlzAAAD6AAAA+gBtXtSawAAASNJREFUGJUBGAHn/gBn4MeljnRQOSD648mkjnRQOB/54sijjXNPNx/44sej" +
      "jHJONh734cYAootyTTYd9+DFoYpxTDUc9t/FoIpwTDQb9d7En4lvSzMb9N7Dn4huAEoyGvPdwp6HbkkyGfPcwZ2GbUgxGPLb" +
      "wZ2GbEgwF/HawJyFa0cvFwDw2r+bhGpGLhbv2b6ag2pFLhXv2L6ZgmlELRTu172ZgmhELBTt1rwAmIFnQysT7Na7l4BnQioS" +
      "69W6ln9mQSoS69S6lX5lQCkR6tO5lX5kAEAoEenSuJR9Yz8nEOjSt5N8Yz4mD+fRtpJ7Yj0mDufQtpF6YTwlDQDmz7WRemA8" +
      "JA3lzrSQeV87IwzkzrOPeF86IwvjzbKOd145IgrjzLI5roroGhMCnAAAAABJRU5ErkJggg==",
  },
];

const sha16 = (data: Uint8Array): string => createHash("sha256").update(data).digest("hex").slice(0, 16);

describe("decoding matches Pillow's convert('RGB')", () => {
  for (const s of SAMPLES) {
    it(`${s.name} (Pillow mode ${s.pillowMode})`, async () => {
      const img = await loadImage(Buffer.from(s.b64, "base64"), s.name);
      expect([img.width, img.height]).toEqual([s.width, s.height]);
      expect(img.data.length).toBe(s.width * s.height * 3);
      expect(sha16(img.data)).toBe(s.sha);
    });
  }

  it("a transparent GIF pixel keeps its palette colour (alpha is dropped, not composited)", async () => {
    // 2x1 GIF, palette [red, green], index 1 transparent; pixels [0, 1].
    const gif = Buffer.from([
      ...Buffer.from("GIF89a"), 2, 0, 1, 0, 0x80, 0, 0, // screen 2x1, global palette of 2
      255, 0, 0, 0, 255, 0, // palette: red, green
      0x21, 0xf9, 4, 1, 0, 0, 1, 0, // graphic control: transparent index 1
      0x2c, 0, 0, 0, 0, 2, 0, 1, 0, 0, // image 2x1 at 0,0
      2, 2, 0x44, 0x0a, 0, // LZW min size 2: codes clear(4), 0, 1, end(5) in 3-bit codes
      0x3b,
    ]);
    const img = await loadImage(gif);
    expect(Array.from(img.data)).toEqual([255, 0, 0, 0, 255, 0]);
  });
});

describe("EXIF orientation, when asked for (exifOrientation: true)", () => {
  // 13x7, every pixel different, so any wrong turn or mirror shows.
  const width = 13;
  const height = 7;
  const pixels = Buffer.from(Array.from({ length: width * height * 3 }, (_, i) => (i * 37) % 251));

  it.each([1, 2, 3, 4, 5, 6, 7, 8])("orientation %i is turned upright as libvips' autorotate does it", async (orientation) => {
    const jpeg = await sharp(pixels, { raw: { width, height, channels: 3 } }).jpeg({ quality: 100 }).withMetadata({ orientation }).toBuffer();
    const upright = await sharp(jpeg).rotate().raw().toBuffer({ resolveWithObject: true });
    const img = await loadImage(jpeg, "photo", { exifOrientation: true });
    expect([img.width, img.height]).toEqual([upright.info.width, upright.info.height]);
    expect(Buffer.from(img.data).equals(upright.data)).toBe(true);
    // Not asked for: as Pillow's open, the stored pixels as they are.
    const stored = await loadImage(jpeg, "photo");
    expect([stored.width, stored.height]).toEqual([width, height]);
    expect(Buffer.from(stored.data).equals(await sharp(jpeg).raw().toBuffer())).toBe(true);
  });
});
