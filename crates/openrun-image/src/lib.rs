//! openrun's image store: content-addressed layers shared read-only by every sandbox, named
//! images with tags, OCI image layout and `docker save` import, and garbage collection.
//!
//! - [`Store`] (`store.rs`): the on-disk store under `<data-dir>/images/store/`, its lock,
//!   commits that make layers and records visible atomically, prune, and
//!   [`Store::sandbox_image`], which resolves a name for a new sandbox.
//! - [`layer`]: safe unpacking of layer tars (the security boundary: nothing in an archive can
//!   write outside its layer or through a link) and deterministic tars of directory trees.
//! - [`oci`]: import of OCI layouts (directory or tar) and `docker save` archives, every
//!   blob and layer verified against its digest.
//! - [`ImageRef`] (`name.rs`): `name[:tag]` parsing and rules.

pub mod build;
pub mod cache;
pub mod context;
pub mod copy;
pub mod debian;
pub mod diff;
pub mod digest;
pub mod dockerfile;
pub mod error;
pub mod freeze;
#[doc(hidden)]
pub mod fuzzing;
pub mod layer;
pub mod name;
pub mod oci;
pub mod rootfs;
pub mod snapshot;
mod store;

pub use error::{ImageError, Result};
pub use layer::IdShift;
pub use name::ImageRef;
pub use oci::{import, ImportProgress, ImportReport};
pub use store::{
    now, sandbox_image, ImageBase, ImageConfig, ImageRecord, LayerInfo, Lease, PruneReport,
    SandboxImage, StagedLayer, Store, MAX_LAYERS,
};
