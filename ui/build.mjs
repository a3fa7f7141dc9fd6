// Bundle the dashboard into weaver/static (served by weaver/ui_server.py): index.html,
// assets/app.js and assets/app.css. Deterministic: the same sources give the same bytes.
import { build } from "esbuild";
import { copyFileSync, mkdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
// TORCHLOOM_UI_OUT lets the drift test build elsewhere and compare with the committed output.
const out = process.env.TORCHLOOM_UI_OUT || join(here, "..", "weaver", "static");
mkdirSync(join(out, "assets"), { recursive: true });

await build({
  entryPoints: { app: join(here, "src", "app.js") },
  bundle: true,
  format: "esm",
  target: ["es2022"],
  minify: true,
  sourcemap: false,
  legalComments: "none",
  outdir: join(out, "assets"),
  logLevel: "warning",
});
copyFileSync(join(here, "src", "index.html"), join(out, "index.html"));
console.log(`built ${out}`);
