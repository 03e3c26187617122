//! The two macros that give every configuration key one source of truth.
//!
//! - [`settings!`] declares a config struct: each field's name, type, default and doc comment
//!   in one place. It generates the struct (serde, `#[serde(default)]`), its `Default`, and
//!   `keys()`, the (name, documentation) of every key including those of flattened parts, from
//!   which `prefer train --help-config` and the unknown-key check are made.
//! - [`choice!`] declares a closed set of values (an enum spelled as TRL spells it), parsed with
//!   a "did you mean" error.

/// A config struct; see the module docs. Flattened parts (`flatten { ... }`) are structs
/// declared with `settings!` themselves, whose keys appear at this struct's top level.
macro_rules! settings {
    (
        $(#[doc = $sdoc:literal])*
        pub struct $name:ident {
            $(
                $(#[doc = $doc:literal])*
                pub $field:ident : $ty:ty = $default:expr
            ),* $(,)?
        }
        $(flatten {
            $(
                $(#[doc = $fdoc:literal])*
                pub $ffield:ident : $fty:ty
            ),* $(,)?
        })?
    ) => {
        $(#[doc = $sdoc])*
        #[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
        #[serde(default)]
        pub struct $name {
            $( $(#[doc = $doc])* pub $field: $ty, )*
            $($( $(#[doc = $fdoc])* #[serde(flatten)] pub $ffield: $fty, )*)?
        }

        impl Default for $name {
            fn default() -> Self {
                $name {
                    $( $field: $default, )*
                    $($( $ffield: <$fty>::default(), )*)?
                }
            }
        }

        impl $name {
            /// The keys in sections, one per struct (its doc comment as the title): this
            /// struct's own keys with their documentation (the fields' doc comments), then each
            /// flattened part's sections.
            pub fn sections() -> Vec<(&'static str, Vec<(&'static str, &'static str)>)> {
                #[allow(unused_mut)]
                let mut out = vec![(
                    concat!($($sdoc, "\n"),*),
                    vec![$( (stringify!($field), concat!($($doc, "\n"),*)) ),*],
                )];
                $($( out.extend(<$fty>::sections()); )*)?
                out
            }

            /// Every key with its documentation, in declaration order (flattened parts' after
            /// this struct's own).
            pub fn keys() -> Vec<(&'static str, &'static str)> {
                Self::sections().into_iter().flat_map(|(_, keys)| keys).collect()
            }
        }
    };
}

/// A closed set of values with the spellings users write (`alias`es accepted when parsing);
/// serialises as its first spelling, and a wrong value is an error that lists the choices and
/// suggests the closest.
macro_rules! choice {
    (
        $(#[$m:meta])*
        pub enum $name:ident {
            $(
                $(#[doc = $doc:literal])*
                $variant:ident = $text:literal $(| $alias:literal)*
            ),+ $(,)?
        }
    ) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[doc = $doc])* $variant, )+
        }

        impl $name {
            /// The names (one per value).
            pub const NAMES: &'static [&'static str] = &[$($text),+];
            /// Every accepted spelling: the names, then the aliases.
            pub const SPELLINGS: &'static [&'static str] = &[$($text),+ $($(, $alias)*)+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $text, )+
                }
            }

            /// The value spelled `s`, or a message that lists the choices and suggests the
            /// closest.
            pub fn parse(s: &str) -> std::result::Result<Self, String> {
                match s {
                    $( $text $(| $alias)* => Ok($name::$variant), )+
                    _ => Err($crate::util::text::not_one_of(s, Self::NAMES, Self::SPELLINGS)),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let s = <String as serde::Deserialize>::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}
