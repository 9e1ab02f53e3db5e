"""QM9 as PyTorch Geometric's ``qm9_nn_conv.py`` example sees it, built from qm9pack's CSV files.

The source is the CSV files of the ``qm9pack`` package (130,831 molecules: the
133,885 of QM9 less the 3,054 whose geometry did not converge, as PyG drops
them), read directly with pandas: qm9pack's ``__init__`` imports
``pkg_resources``, so it is located with :func:`importlib.util.find_spec` and
never imported. Any directory holding ``qm9_part*.csv`` files with the same
columns serves (the test fixture ``tests/data/qm9_subset``).

Per molecule (padded to ``MAX_ATOMS = 29`` atoms, in the atom order of the
coordinates, which is the order of PyG's SDF):

- ``atoms`` ``(29, 4)`` int8: atomic number, aromatic, hybridisation (0 other,
  1 sp, 2 sp2, 3 sp3), number of bonded hydrogens. :func:`node_features`
  expands them to PyG's 11 node features (one-hot H/C/N/O/F, atomic number,
  aromatic, sp, sp2, sp3, number of hydrogens).
- ``bonds`` ``(29, 29)`` int8: 0 no bond, 1 single, 2 double, 3 triple,
  4 aromatic; ``bonds_kekule``: the same with aromatic rings kekulised.
  :func:`edge_features` gives the 5 edge features of every ordered pair of
  distinct atoms (the example's ``Complete`` + ``Distance(norm=False)``): the
  bond-type one-hot (zero where no bond) and the distance in Angstrom.
- ``positions`` ``(29, 3)`` float32, Angstrom; ``num_atoms``.
- ``targets`` ``(11,)`` float64 in the units the official nash-mtl code reports
  its MAEs in (``TARGETS``/``UNITS``): PyG's targets ``[0, 1, 2, 3, 5, 6, 12,
  13, 14, 15, 11]`` with hartree converted to eV (``HARTREE_TO_EV``), the four
  energies as atomisation energies (total minus the atoms' reference energies
  ``ATOMREF``), and the eV ones times 1000 (meV). Standardisation is scale-free,
  so training on these equals training on PyG's eV values.

Node and bond features come from RDKit. The molecule is parsed from the
SMILES column (sanitised: RDKit's aromaticity and hybridisation) and matched
to the coordinates: its heavy atoms are the coordinates' heavy atoms in order
(every QM9 xyz file lists them in SMILES order; charged molecules interleave
the hydrogens of ``[NH+]`` and the like, which the match skips), and every
hydrogen is bonded to its nearest heavy atom, checked against RDKit's hydrogen
count of that atom. Molecules that fail the match fall back to RDKit's
``rdDetermineBonds`` on the coordinates (bond orders from the geometry), then
to connectivity alone (single bonds); :func:`load` reports the counts.

PyG's own processing differs in one documented way (pyg-team/pytorch_geometric
issues 2163 and 8370): it reads the SDF with ``sanitize=False``, so its
aromatic and sp/sp2/sp3 features are zero for every atom and no bond is
aromatic (the SDF is kekulised). ``node_features(..., pyg_sdf=True)`` and the
``bonds_kekule`` array reproduce that.

The built arrays are cached as one compressed ``.npz`` (about 40 MB for the
full set) under ``$OPTAX_MTL_QM9_CACHE`` or ``~/.cache/optax_mtl/qm9``, named by
a hash of the source files' names, sizes and modification times and of
``BUILD_VERSION``: a changed source builds a new cache file.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import pathlib
import time

import numpy as np

MAX_ATOMS = 29
NUM_NODE_FEATURES = 11
NUM_EDGE_FEATURES = 5
BUILD_VERSION = "1"  # bump when the built arrays change meaning

TARGETS = ("mu", "alpha", "homo", "lumo", "r2", "zpve", "U0", "U", "H", "G", "Cv")
UNITS = ("D", "a0^3", "meV", "meV", "a0^2", "meV", "meV", "meV", "meV", "meV", "cal/mol K")
# The single-task MAEs of the Nash-MTL paper (nash-mtl experiments/quantum_chemistry/utils.py).
PAPER_STL = (0.0671, 0.1814, 60.576, 53.915, 0.5027, 4.539, 58.838, 64.244, 63.852, 66.223, 0.07212)

HARTREE_TO_EV = 27.211386
ELEMENTS = ("H", "C", "N", "O", "F")
ATOMIC_NUMBER = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}
# QM9's reference energies of the free atoms (hartree; U0, U, H, G).
ATOMREF = {
    "H": (-0.500273, -0.498857, -0.497912, -0.510927),
    "C": (-37.846772, -37.845355, -37.844411, -37.861317),
    "N": (-54.583861, -54.582445, -54.581501, -54.598897),
    "O": (-75.064579, -75.063162, -75.062219, -75.079532),
    "F": (-99.718730, -99.717314, -99.716370, -99.733544),
}
COLUMNS = ("Index", "SMILES", "Elements", "XYZ_Ang", "Dipole_debye", "Polarizability_bohr3", "HOMO_au",
           "LUMO_au", "R2_bohr2", "ZPVE_au", "InternalEnergy_0K_au", "InternalEnergy_298K_au",
           "Enthalphy_298K_au", "GibbsFreeEnergy_298K_au", "Heatcapacity_Cv_cal_mol_K")
ENERGY_COLUMNS = ("InternalEnergy_0K_au", "InternalEnergy_298K_au", "Enthalphy_298K_au", "GibbsFreeEnergy_298K_au")

HYBRIDISATION = {"SP": 1, "SP2": 2, "SP3": 3}
BOND_CODE = {"SINGLE": 1, "DOUBLE": 2, "TRIPLE": 3, "AROMATIC": 4}
MATCH_KINDS = ("smiles", "determine_bonds", "connectivity")


# ----------------------------------------------------------------------------- source and cache


def default_source_dir() -> pathlib.Path | None:
  """qm9pack's data folder (without importing qm9pack), or None when it is not installed."""
  spec = importlib.util.find_spec("qm9pack")
  if spec is None or not spec.submodule_search_locations:
    return None
  folder = pathlib.Path(list(spec.submodule_search_locations)[0]) / "data"
  return folder if folder.is_dir() else None


def source_files(source_dir) -> list[pathlib.Path]:
  files = sorted(pathlib.Path(p) for p in glob.glob(os.path.join(source_dir, "qm9_part*.csv*")))
  if not files:
    raise FileNotFoundError(f"no qm9_part*.csv files in {source_dir}")
  return files


def source_key(source_dir) -> str:
  """A hash of the source files' names, sizes and modification times, and of ``BUILD_VERSION``."""
  digest = hashlib.sha1(BUILD_VERSION.encode())
  for path in source_files(source_dir):
    stat = path.stat()
    digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
  return digest.hexdigest()[:16]


def default_cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("OPTAX_MTL_QM9_CACHE", pathlib.Path.home() / ".cache" / "optax_mtl" / "qm9"))


def load(source_dir=None, cache_dir=None, *, progress: bool = True) -> dict:
  """The built arrays (see the module docstring), from the cache or built and cached once.

  Returns a dict of NumPy arrays plus ``"cache_path"`` and ``"built"`` (whether
  this call built them).
  """
  source_dir = pathlib.Path(source_dir) if source_dir is not None else default_source_dir()
  if source_dir is None:
    raise FileNotFoundError("QM9 source not found: pip install qm9pack, or pass the folder of its CSV files")
  cache_dir = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
  path = cache_dir / f"qm9_{source_key(source_dir)}.npz"
  built = not path.exists()
  if built:
    data = build(source_dir, progress=progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez_compressed(partial, **data)
    os.replace(partial, path)  # atomic: a concurrent reader never sees half a file
  with np.load(path) as archive:
    data = {name: archive[name] for name in archive.files}
  data["cache_path"], data["built"] = str(path), built
  return data


# ----------------------------------------------------------------------------- building


def read_raw(source_dir):
  """The source rows (``COLUMNS``) of every ``qm9_part*.csv``, in QM9 index order."""
  import pandas as pd

  frames = [pd.read_csv(path, usecols=list(COLUMNS)) for path in source_files(source_dir)]
  return pd.concat(frames, ignore_index=True).sort_values("Index", kind="stable").reset_index(drop=True)


def parse_elements(text: str) -> list[str]:
  return [e.strip().strip("'\"") for e in text.strip()[1:-1].split(",")]


def parse_positions(text: str) -> np.ndarray:
  values = np.array(text.replace("[", " ").replace("]", " ").replace(",", " ").split(), np.float64)
  return values.reshape(-1, 3)


def targets_of(rows) -> np.ndarray:
  """``(n, 11)`` float64 targets in ``UNITS`` (the official evaluation's units)."""
  ev_to_mev = 1000.0 * HARTREE_TO_EV
  out = np.empty((len(rows), len(TARGETS)), np.float64)
  out[:, 0] = rows["Dipole_debye"]
  out[:, 1] = rows["Polarizability_bohr3"]
  out[:, 2] = rows["HOMO_au"] * ev_to_mev
  out[:, 3] = rows["LUMO_au"] * ev_to_mev
  out[:, 4] = rows["R2_bohr2"]
  out[:, 5] = rows["ZPVE_au"] * ev_to_mev
  counts = np.array([[parse_elements(e).count(s) for s in ELEMENTS] for e in rows["Elements"]], np.float64)
  refs = np.array([ATOMREF[s] for s in ELEMENTS], np.float64)  # (5 elements, 4 energies)
  atoms_energy = counts @ refs  # (n, 4)
  for j, column in enumerate(ENERGY_COLUMNS):
    out[:, 6 + j] = (rows[column].to_numpy(np.float64) - atoms_energy[:, j]) * ev_to_mev
  out[:, 10] = rows["Heatcapacity_Cv_cal_mol_K"]
  return out


def _rdkit():
  from rdkit import Chem, RDLogger
  from rdkit.Chem import rdDetermineBonds

  RDLogger.DisableLog("rdApp.*")
  return Chem, rdDetermineBonds


def _atom_codes(mol, order):
  """``(len(order), 3)``: aromatic, hybridisation code, bonded-hydrogen count of the mol's atoms ``order``."""
  codes = []
  for index in order:
    atom = mol.GetAtomWithIdx(int(index))
    codes.append((int(atom.GetIsAromatic()), HYBRIDISATION.get(str(atom.GetHybridization()), 0)))
  return codes


def _bond_code(bond) -> int:
  return BOND_CODE.get(str(bond.GetBondType()), 1)


def molecule_graph(smiles: str, elements: list[str], positions: np.ndarray):
  """RDKit features of one molecule in the coordinates' atom order.

  Returns:
    ``(atoms, bonds, bonds_kekule, kind)``: ``atoms`` ``(n, 4)`` (atomic number,
    aromatic, hybridisation, bonded hydrogens), the two ``(n, n)`` bond-code
    matrices and how the graph was obtained (one of ``MATCH_KINDS``).
  """
  Chem, _ = _rdkit()
  n = len(elements)
  heavy = [i for i, e in enumerate(elements) if e != "H"]
  hydrogens = [i for i, e in enumerate(elements) if e == "H"]
  atoms = np.zeros((n, 4), np.int8)
  atoms[:, 0] = [ATOMIC_NUMBER[e] for e in elements]
  bonds = np.zeros((n, n), np.int8)
  kekule = np.zeros((n, n), np.int8)

  mol = Chem.MolFromSmiles(smiles)
  if mol is not None and [a.GetSymbol() for a in mol.GetAtoms()] == [elements[i] for i in heavy]:
    distances = np.linalg.norm(positions[hydrogens][:, None] - positions[heavy][None], axis=-1)
    owner = np.argmin(distances, axis=1) if hydrogens else np.zeros(0, int)
    counts = np.bincount(owner, minlength=len(heavy))
    if list(counts) == [a.GetTotalNumHs() for a in mol.GetAtoms()]:
      kek = Chem.Mol(mol)
      Chem.Kekulize(kek, clearAromaticFlags=True)
      for target, source in ((bonds, mol), (kekule, kek)):
        for bond in source.GetBonds():
          i, j = heavy[bond.GetBeginAtomIdx()], heavy[bond.GetEndAtomIdx()]
          target[i, j] = target[j, i] = _bond_code(bond)
      for h, k in zip(hydrogens, owner):
        bonds[h, heavy[k]] = bonds[heavy[k], h] = 1
        kekule[h, heavy[k]] = kekule[heavy[k], h] = 1
      atoms[heavy, 1:3] = _atom_codes(mol, range(len(heavy)))
      atoms[heavy, 3] = counts
      return atoms, bonds, kekule, "smiles"
  return _graph_from_geometry(elements, positions, atoms, bonds, kekule)


def _graph_from_geometry(elements, positions, atoms, bonds, kekule):
  """The fallback: bonds perceived from the coordinates by RDKit's ``rdDetermineBonds``."""
  Chem, rdDetermineBonds = _rdkit()
  block = f"{len(elements)}\n\n" + "\n".join(f"{e} {x:.8f} {y:.8f} {z:.8f}" for e, (x, y, z) in zip(elements, positions))
  mol = Chem.MolFromXYZBlock(block)
  kind = "determine_bonds"
  try:
    rdDetermineBonds.DetermineBonds(mol, charge=0)
    kek = Chem.Mol(mol)
    Chem.SanitizeMol(mol)
  except Exception:  # noqa: BLE001 (RDKit raises several kinds): keep the connectivity
    mol = Chem.MolFromXYZBlock(block)
    rdDetermineBonds.DetermineConnectivity(mol)
    kek, kind = mol, "connectivity"
  for target, source in ((bonds, mol), (kekule, kek)):
    for bond in source.GetBonds():
      i, j = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
      target[i, j] = target[j, i] = 1 if kind == "connectivity" else _bond_code(bond)
  if kind != "connectivity":
    atoms[:, 1:3] = _atom_codes(mol, range(len(elements)))
  is_h = np.array([e == "H" for e in elements])
  atoms[:, 3] = ((bonds > 0) & is_h[None, :]).sum(axis=1)
  return atoms, bonds, kekule, kind


def build(source_dir, *, progress: bool = True) -> dict:
  """Parses the source CSVs and builds every molecule's arrays (about 2 minutes for the full set)."""
  from tqdm import tqdm

  rows = read_raw(source_dir)
  n = len(rows)
  out = {
      "index": rows["Index"].to_numpy(np.int32),
      "num_atoms": np.zeros(n, np.int8),
      "atoms": np.zeros((n, MAX_ATOMS, 4), np.int8),
      "bonds": np.zeros((n, MAX_ATOMS, MAX_ATOMS), np.int8),
      "bonds_kekule": np.zeros((n, MAX_ATOMS, MAX_ATOMS), np.int8),
      "positions": np.zeros((n, MAX_ATOMS, 3), np.float32),
      "targets": targets_of(rows),
      "match_kind": np.zeros(n, np.int8),
  }
  start = time.perf_counter()
  triples = zip(rows["SMILES"], rows["Elements"], rows["XYZ_Ang"])
  for i, (smiles, elements, xyz) in enumerate(tqdm(triples, total=n, desc="building QM9", disable=not progress)):
    elements, positions = parse_elements(elements), parse_positions(xyz)
    m = len(elements)
    if positions.shape != (m, 3) or m > MAX_ATOMS:
      raise ValueError(f"molecule {rows['Index'][i]}: {m} elements, positions {positions.shape}")
    atoms, bonds, kekule, kind = molecule_graph(smiles, elements, positions)
    out["num_atoms"][i] = m
    out["atoms"][i, :m] = atoms
    out["bonds"][i, :m, :m] = bonds
    out["bonds_kekule"][i, :m, :m] = kekule
    out["positions"][i, :m] = positions
    out["match_kind"][i] = MATCH_KINDS.index(kind)
  out["build_seconds"] = np.float64(time.perf_counter() - start)
  return out


def match_counts(data: dict) -> dict:
  """How many molecules got their graph from each of ``MATCH_KINDS``."""
  counts = np.bincount(data["match_kind"], minlength=len(MATCH_KINDS))
  return {kind: int(c) for kind, c in zip(MATCH_KINDS, counts)}


# ----------------------------------------------------------------------------- split and features


def split(num_molecules: int, seed: int, *, train_size=None, val_size=None, test_size=None,
          part: int = 10_000) -> dict[str, np.ndarray]:
  """Indices of the seeded shuffle: test = the first ``part``, val = the next ``part``, train = the rest.

  ``part`` is 10,000 (the paper's protocol), or a tenth of the molecules when
  there are fewer than 100,000 (a subset). Each size option keeps a prefix of
  its part (a reduced protocol); ``None`` keeps the whole part.
  """
  part = min(part, num_molecules // 10)
  perm = np.random.default_rng(seed).permutation(num_molecules)
  parts = {"test": perm[:part], "val": perm[part:2 * part], "train": perm[2 * part:]}
  sizes = {"train": train_size, "val": val_size, "test": test_size}
  out = {}
  for name, indices in parts.items():
    size = sizes[name]
    if size is not None and size > len(indices):
      raise ValueError(f"--{name}-size {size} exceeds the {len(indices)} molecules of the {name} part")
    out[name] = indices if size is None else indices[:size]
  return out


def node_features(atoms, xp=np, *, pyg_sdf: bool = False):
  """``(..., 29, 11)`` float32 node features from ``atoms`` ``(..., 29, 4)``; padded atoms are zeros.

  ``xp`` is ``numpy`` or ``jax.numpy``. ``pyg_sdf`` zeroes the aromatic and
  hybridisation features, as PyG's processing of the SDF does.
  """
  z, aromatic, hybrid, hs = (atoms[..., i].astype(xp.float32) for i in range(4))
  onehot = [(z == ATOMIC_NUMBER[e]).astype(xp.float32) for e in ELEMENTS]
  flags = [aromatic, hybrid == 1, hybrid == 2, hybrid == 3]
  flags = [xp.zeros_like(z) if pyg_sdf else f.astype(xp.float32) for f in flags]
  return xp.stack([*onehot, z, *flags, hs], axis=-1)


def edge_features(bonds, positions, xp=np):
  """``(..., 29, 29, 5)`` float32: bond-type one-hot (single, double, triple, aromatic) and distance (Angstrom).

  Every ordered pair gets a value; the model masks self-pairs and padding.
  """
  onehot = [(bonds == code).astype(xp.float32) for code in (1, 2, 3, 4)]
  delta = positions[..., :, None, :] - positions[..., None, :, :]
  distance = xp.sqrt(xp.sum(delta * delta, axis=-1))
  return xp.stack([*onehot, distance.astype(xp.float32)], axis=-1)
