using System.Buffers;
using System.Buffers.Binary;
using Orleans.Serialization;
using Orleans.Storage;
using OrleansIdempotency.Grains;

namespace OrleansIdempotency.Silo.Storage;

/// <summary>
/// Stores grain state with Orleans' own binary serializer (version-tolerant through <c>[Id]</c>s, and far cheaper
/// than JSON), behind a 17-byte header: two big-endian Unix-millisecond times that PostgreSQL reads (see
/// <c>PostgresSchema.sql</c>): when the record may be purged (<see cref="IdempotencyRecord.PurgeableAt"/>), into the
/// indexed <c>ExpiresAt</c> column so expired rows can be purged without decoding payloads; and the time after which
/// the write must not land at all; then the payload's format (<see cref="Format"/>), so that a later format is told
/// apart instead of misread.
/// </summary>
/// <remarks>
/// A write can reach PostgreSQL long after the grain sent it: queued behind a network partition, or retransmitted
/// by TCP once the partition heals. For a claim that is harmful: its caller gave up long ago (and was told nothing
/// ran), yet the claim would land and, its lease already over, leave the key "outcome unknown" although the
/// action never ran. So a claim is valid only until its lease ends, and PostgreSQL refuses it after that (the
/// grain then sees a version conflict). Other records are valid whenever they land.
/// </remarks>
public sealed class IdempotencyStorageSerializer(Serializer serializer) : IGrainStorageSerializer
{
    /// <summary>The length of the header: the expiry, the time the write is valid until, the format.</summary>
    public const int HeaderLength = 2 * sizeof(long) + 1;

    /// <summary>
    /// The format written. Rows written before the header had a format byte (format 0) have Orleans' encoding of the
    /// record where the byte now is: a field header, whose wire type puts it at 0x20 or above, so never a format.
    /// </summary>
    public const byte Format = 1;

    private const int LegacyHeaderLength = 2 * sizeof(long);

    public BinaryData Serialize<T>(T? input)
    {
        var buffer = new ArrayBufferWriter<byte>(256);
        Serialize(input, buffer);
        return new BinaryData(buffer.WrittenMemory);
    }

    /// <summary>Writes what <see cref="Serialize{T}(T)"/> returns into <paramref name="output"/>.</summary>
    public void Serialize<T>(T? input, IBufferWriter<byte> output)
    {
        var (expiresAt, validUntil) = input is IdempotencyRecord record
            ? (record.PurgeableAt, record.Status == IdempotencyStatus.InProgress ? record.LeaseExpiresAt : DateTimeOffset.MaxValue)
            : (DateTimeOffset.MaxValue, DateTimeOffset.MaxValue);
        var header = output.GetSpan(HeaderLength);
        BinaryPrimitives.WriteInt64BigEndian(header, expiresAt.ToUnixTimeMilliseconds());
        BinaryPrimitives.WriteInt64BigEndian(header[sizeof(long)..], validUntil.ToUnixTimeMilliseconds());
        header[LegacyHeaderLength] = Format;
        output.Advance(HeaderLength);
        serializer.Serialize(input, output);
    }

    public T Deserialize<T>(BinaryData input)
    {
        var bytes = input.ToMemory().Span;
        var format = bytes.Length > LegacyHeaderLength ? bytes[LegacyHeaderLength] : (byte)0;
        var payload = format switch
        {
            Format => bytes[HeaderLength..],
            >= 0x20 => bytes[LegacyHeaderLength..],
            _ => throw new InvalidDataException(
                $"A stored {typeof(T).Name} is in format {format}; this version reads formats 0 and {Format}. A newer version wrote it: upgrade every silo."),
        };
        return serializer.Deserialize<T>(payload) ?? throw new InvalidDataException($"Stored state of {typeof(T).Name} decoded to null.");
    }
}
