using System.Net.Sockets;
using System.Text;

namespace OrleansIdempotency.Api.Tests.EndToEnd;

/// <summary>
/// HTTP/1.1 over a plain socket, byte for byte as written: HttpClient refuses to send many of the malformed
/// headers the hostile-input tests need (control characters, raw non-ASCII, duplicate singletons).
/// </summary>
internal static class RawHttp
{
    public sealed record Response(int Status, Dictionary<string, string> Headers, byte[] Body)
    {
        public string Text => Encoding.UTF8.GetString(Body);

        public string? ContentType => Headers.GetValueOrDefault("content-type");
    }

    /// <remarks>Sends <c>Content-Length</c> unless <paramref name="headers"/> name a <c>Transfer-Encoding</c>.</remarks>
    public static async Task<Response> SendAsync(Uri server, string method, string target, IEnumerable<(string Name, string Value)> headers, byte[] body)
    {
        using var client = new TcpClient();
        await client.ConnectAsync(server.Host, server.Port);
        await using var stream = client.GetStream();
        var head = new StringBuilder();
        head.Append(method).Append(' ').Append(target).Append(" HTTP/1.1\r\n");
        head.Append("Host: ").Append(server.Authority).Append("\r\n");
        head.Append("Connection: close\r\n");
        if (!headers.Any(h => h.Name.Equals("Transfer-Encoding", StringComparison.OrdinalIgnoreCase)))
        {
            head.Append("Content-Length: ").Append(body.Length).Append("\r\n");
        }

        foreach (var (name, value) in headers)
        {
            head.Append(name).Append(": ").Append(value).Append("\r\n");
        }

        head.Append("\r\n");
        // UTF-8 on purpose: a non-ASCII header value goes out as the raw bytes a careless client would send.
        await stream.WriteAsync(Encoding.UTF8.GetBytes(head.ToString()));
        await stream.WriteAsync(body);
        using var received = new MemoryStream();
        await stream.CopyToAsync(received);
        return Parse(received.ToArray());
    }

    private static Response Parse(byte[] raw)
    {
        var split = raw.AsSpan().IndexOf("\r\n\r\n"u8);
        var head = Encoding.ASCII.GetString(raw, 0, split).Split("\r\n");
        var status = int.Parse(head[0].Split(' ')[1], System.Globalization.CultureInfo.InvariantCulture);
        var headers = head.Skip(1)
            .Select(line => line.Split(':', 2))
            .GroupBy(parts => parts[0].Trim().ToLowerInvariant())
            .ToDictionary(g => g.Key, g => string.Join(", ", g.Select(parts => parts[1].Trim())));
        var body = raw.AsSpan(split + 4).ToArray();
        return new Response(status, headers, headers.GetValueOrDefault("transfer-encoding") == "chunked" ? Dechunk(body) : body);
    }

    private static byte[] Dechunk(byte[] body)
    {
        using var result = new MemoryStream();
        var position = 0;
        while (true)
        {
            var lineEnd = body.AsSpan(position).IndexOf("\r\n"u8) + position;
            var size = Convert.ToInt32(Encoding.ASCII.GetString(body, position, lineEnd - position).Split(';')[0], 16);
            if (size == 0)
            {
                return result.ToArray();
            }

            result.Write(body, lineEnd + 2, size);
            position = lineEnd + 2 + size + 2;
        }
    }
}
