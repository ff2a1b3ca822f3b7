//! Element types, reduction operators, collective names and the 16-bit wire formats.
//!
//! One generic trait ([`Element`]) covers every dtype; the table of dtypes lives in
//! one macro invocation below, so adding a type is one line.

use std::fmt;

use half::{bf16, f16};

/// Wire tag of an element type (also the C ABI's `hetcclDataType_t` values).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum DataType {
    /// `i8`
    I8 = 0,
    /// `u8`
    U8 = 1,
    /// `i32`
    I32 = 2,
    /// `u32`
    U32 = 3,
    /// `i64`
    I64 = 4,
    /// `u64`
    U64 = 5,
    /// IEEE half precision
    F16 = 6,
    /// `f32`
    F32 = 7,
    /// `f64`
    F64 = 8,
    /// bfloat16
    Bf16 = 9,
}

/// A reduction operator.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ReduceOp {
    /// a + b
    Sum = 0,
    /// a * b
    Prod = 1,
    /// max(a, b)
    Max = 2,
    /// min(a, b)
    Min = 3,
    /// sum / world_size (integer division for integer types)
    Avg = 4,
}

/// The collectives, as named in messages and errors.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum CollectiveOp {
    /// all_reduce
    AllReduce = 1,
    /// reduce_scatter
    ReduceScatter = 2,
    /// all_gather
    AllGather = 3,
    /// broadcast
    Broadcast = 4,
    /// reduce
    Reduce = 5,
    /// barrier
    Barrier = 6,
    /// point-to-point send/recv
    SendRecv = 7,
}

/// An element type that collectives can move and reduce.
///
/// Reductions of 16-bit floats are computed in f32 and rounded once per step.
pub trait Element:
    bytemuck::Pod + Send + Sync + PartialEq + PartialOrd + fmt::Debug + 'static
{
    /// The wire tag of this type.
    const DTYPE: DataType;
    /// a + b
    fn add(a: Self, b: Self) -> Self;
    /// a * b
    fn mul(a: Self, b: Self) -> Self;
    /// max(a, b); NaN propagates for floats.
    fn max(a: Self, b: Self) -> Self;
    /// min(a, b); NaN propagates for floats.
    fn min(a: Self, b: Self) -> Self;
    /// `self / n`, as `Avg` needs (integer division for integers).
    fn div_count(self, n: usize) -> Self;
    /// Lossy conversion from f64 (used by tests and tools to build inputs).
    fn from_f64(v: f64) -> Self;
    /// Lossy conversion to f64.
    fn to_f64(self) -> f64;
}

macro_rules! int_element {
    ($t:ty, $tag:ident) => {
        impl Element for $t {
            const DTYPE: DataType = DataType::$tag;
            #[inline(always)]
            fn add(a: Self, b: Self) -> Self {
                a.wrapping_add(b)
            }
            #[inline(always)]
            fn mul(a: Self, b: Self) -> Self {
                a.wrapping_mul(b)
            }
            #[inline(always)]
            fn max(a: Self, b: Self) -> Self {
                Ord::max(a, b)
            }
            #[inline(always)]
            fn min(a: Self, b: Self) -> Self {
                Ord::min(a, b)
            }
            #[inline(always)]
            fn div_count(self, n: usize) -> Self {
                self / (n as $t)
            }
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
        }
    };
}

macro_rules! float_element {
    ($t:ty, $tag:ident) => {
        impl Element for $t {
            const DTYPE: DataType = DataType::$tag;
            #[inline(always)]
            fn add(a: Self, b: Self) -> Self {
                a + b
            }
            #[inline(always)]
            fn mul(a: Self, b: Self) -> Self {
                a * b
            }
            #[inline(always)]
            fn max(a: Self, b: Self) -> Self {
                if a.is_nan() || b.is_nan() {
                    <$t>::NAN
                } else if a >= b {
                    a
                } else {
                    b
                }
            }
            #[inline(always)]
            fn min(a: Self, b: Self) -> Self {
                if a.is_nan() || b.is_nan() {
                    <$t>::NAN
                } else if a <= b {
                    a
                } else {
                    b
                }
            }
            #[inline(always)]
            fn div_count(self, n: usize) -> Self {
                self / (n as $t)
            }
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
        }
    };
}

macro_rules! half_element {
    ($t:ty, $tag:ident) => {
        impl Element for $t {
            const DTYPE: DataType = DataType::$tag;
            #[inline(always)]
            fn add(a: Self, b: Self) -> Self {
                <$t>::from_f32(a.to_f32() + b.to_f32())
            }
            #[inline(always)]
            fn mul(a: Self, b: Self) -> Self {
                <$t>::from_f32(a.to_f32() * b.to_f32())
            }
            #[inline(always)]
            fn max(a: Self, b: Self) -> Self {
                <$t>::from_f32(<f32 as Element>::max(a.to_f32(), b.to_f32()))
            }
            #[inline(always)]
            fn min(a: Self, b: Self) -> Self {
                <$t>::from_f32(<f32 as Element>::min(a.to_f32(), b.to_f32()))
            }
            #[inline(always)]
            fn div_count(self, n: usize) -> Self {
                <$t>::from_f32(self.to_f32() / n as f32)
            }
            fn from_f64(v: f64) -> Self {
                <$t>::from_f64(v)
            }
            fn to_f64(self) -> f64 {
                <$t>::to_f64(self)
            }
        }
    };
}

/// The dtype table: (rust type, tag, size, kind). `for_each_dtype!` expands a macro once
/// per row, so code that must dispatch on a runtime `DataType` never lists types by hand.
#[macro_export]
macro_rules! for_each_dtype {
    ($m:ident) => {
        $m!(i8, I8);
        $m!(u8, U8);
        $m!(i32, I32);
        $m!(u32, U32);
        $m!(i64, I64);
        $m!(u64, U64);
        $m!(half::f16, F16);
        $m!(f32, F32);
        $m!(f64, F64);
        $m!(half::bf16, Bf16);
    };
}

/// Calls `$body` with `$T` bound to the Rust type of a runtime [`DataType`].
#[macro_export]
macro_rules! dispatch_dtype {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            $crate::DataType::I8 => {
                type $T = i8;
                $body
            }
            $crate::DataType::U8 => {
                type $T = u8;
                $body
            }
            $crate::DataType::I32 => {
                type $T = i32;
                $body
            }
            $crate::DataType::U32 => {
                type $T = u32;
                $body
            }
            $crate::DataType::I64 => {
                type $T = i64;
                $body
            }
            $crate::DataType::U64 => {
                type $T = u64;
                $body
            }
            $crate::DataType::F16 => {
                type $T = half::f16;
                $body
            }
            $crate::DataType::F32 => {
                type $T = f32;
                $body
            }
            $crate::DataType::F64 => {
                type $T = f64;
                $body
            }
            $crate::DataType::Bf16 => {
                type $T = half::bf16;
                $body
            }
        }
    };
}

int_element!(i8, I8);
int_element!(u8, U8);
int_element!(i32, I32);
int_element!(u32, U32);
int_element!(i64, I64);
int_element!(u64, U64);
float_element!(f32, F32);
float_element!(f64, F64);
half_element!(f16, F16);
half_element!(bf16, Bf16);

impl DataType {
    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        crate::dispatch_dtype!(self, T => std::mem::size_of::<T>())
    }

    /// True for floating-point types.
    pub fn is_float(self) -> bool {
        matches!(
            self,
            DataType::F16 | DataType::F32 | DataType::F64 | DataType::Bf16
        )
    }

    /// Decodes a wire tag.
    pub fn from_u8(v: u8) -> Option<Self> {
        const ALL: [DataType; 10] = [
            DataType::I8,
            DataType::U8,
            DataType::I32,
            DataType::U32,
            DataType::I64,
            DataType::U64,
            DataType::F16,
            DataType::F32,
            DataType::F64,
            DataType::Bf16,
        ];
        ALL.into_iter().find(|d| *d as u8 == v)
    }

    /// The lower-case name used on command lines (`f32`, `bf16`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DataType::I8 => "i8",
            DataType::U8 => "u8",
            DataType::I32 => "i32",
            DataType::U32 => "u32",
            DataType::I64 => "i64",
            DataType::U64 => "u64",
            DataType::F16 => "f16",
            DataType::F32 => "f32",
            DataType::F64 => "f64",
            DataType::Bf16 => "bf16",
        }
    }

    /// Parses a name as printed by [`DataType::name`] (also `float`, `half`, `int`...).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "i8" | "int8" => DataType::I8,
            "u8" | "uint8" => DataType::U8,
            "i32" | "int32" | "int" => DataType::I32,
            "u32" | "uint32" => DataType::U32,
            "i64" | "int64" => DataType::I64,
            "u64" | "uint64" => DataType::U64,
            "f16" | "half" | "float16" => DataType::F16,
            "f32" | "float" | "float32" => DataType::F32,
            "f64" | "double" | "float64" => DataType::F64,
            "bf16" | "bfloat16" => DataType::Bf16,
            _ => return None,
        })
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl ReduceOp {
    /// Every operation.
    pub const ALL: [ReduceOp; 5] = [
        ReduceOp::Sum,
        ReduceOp::Prod,
        ReduceOp::Max,
        ReduceOp::Min,
        ReduceOp::Avg,
    ];

    /// Decodes a wire tag.
    pub fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|o| *o as u8 == v)
    }

    /// Lower-case name (`sum`, `prod`, `max`, `min`, `avg`).
    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Prod => "prod",
            ReduceOp::Max => "max",
            ReduceOp::Min => "min",
            ReduceOp::Avg => "avg",
        }
    }

    /// Parses a name as printed by [`ReduceOp::name`].
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "sum" => ReduceOp::Sum,
            "prod" => ReduceOp::Prod,
            "max" => ReduceOp::Max,
            "min" => ReduceOp::Min,
            "avg" | "mean" => ReduceOp::Avg,
            _ => return None,
        })
    }
}

impl fmt::Display for ReduceOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl CollectiveOp {
    /// Decodes a wire tag.
    pub fn from_u8(v: u8) -> Option<Self> {
        [
            CollectiveOp::AllReduce,
            CollectiveOp::ReduceScatter,
            CollectiveOp::AllGather,
            CollectiveOp::Broadcast,
            CollectiveOp::Reduce,
            CollectiveOp::Barrier,
            CollectiveOp::SendRecv,
        ]
        .into_iter()
        .find(|o| *o as u8 == v)
    }

    /// snake_case name as in the API (`all_reduce`, ...).
    pub fn name(self) -> &'static str {
        match self {
            CollectiveOp::AllReduce => "all_reduce",
            CollectiveOp::ReduceScatter => "reduce_scatter",
            CollectiveOp::AllGather => "all_gather",
            CollectiveOp::Broadcast => "broadcast",
            CollectiveOp::Reduce => "reduce",
            CollectiveOp::Barrier => "barrier",
            CollectiveOp::SendRecv => "send/recv",
        }
    }
}

impl fmt::Display for CollectiveOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which 16-bit format travels on the wire when gradients are compressed. The kernels and
/// each format's range are [`crate::compression`]'s; the settings name the format, so it
/// sits down here with the other element types.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum WireFormat {
    /// IEEE binary16: 11-bit significand, range ±65504.
    F16 = 0,
    /// bfloat16: 8-bit significand, the range of f32.
    Bf16 = 1,
}

impl WireFormat {
    /// Every format.
    pub const ALL: [WireFormat; 2] = [WireFormat::F16, WireFormat::Bf16];

    /// Decodes a stored tag.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(WireFormat::F16),
            1 => Some(WireFormat::Bf16),
            _ => None,
        }
    }

    /// `fp16` or `bf16`, as in the kernel names.
    pub fn name(self) -> &'static str {
        match self {
            WireFormat::F16 => "fp16",
            WireFormat::Bf16 => "bf16",
        }
    }
}

impl fmt::Display for WireFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_sizes_and_tags_round_trip() {
        let sizes = [1, 1, 4, 4, 8, 8, 2, 4, 8, 2];
        for (tag, size) in sizes.iter().enumerate() {
            let d = DataType::from_u8(tag as u8).unwrap();
            assert_eq!(d as u8, tag as u8);
            assert_eq!(d.size(), *size, "{d}");
            assert_eq!(DataType::parse(d.name()), Some(d));
        }
        assert_eq!(DataType::from_u8(10), None);
    }

    #[test]
    fn float_min_max_propagate_nan() {
        assert!(<f32 as Element>::max(f32::NAN, 1.0).is_nan());
        assert!(<f32 as Element>::min(1.0, f32::NAN).is_nan());
        assert_eq!(<f32 as Element>::max(-1.0, 2.0), 2.0);
        assert_eq!(
            <bf16 as Element>::add(bf16::from_f32(1.0), bf16::from_f32(2.0)).to_f32(),
            3.0
        );
        assert_eq!(<i32 as Element>::div_count(7, 2), 3);
    }
}
