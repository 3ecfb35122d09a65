using System.Net.Http.Headers;
using System.Text;

namespace OrleansIdempotency.Api.Tests.EndToEnd;

internal static class Requests
{
    public const string OrderBody = "{\"customerId\":\"c-1\",\"amount\":12.50,\"items\":[{\"sku\":\"A1\",\"quantity\":2}]}";
    public const string PaymentBody = "{\"amount\":5.00,\"currency\":\"EUR\"}";

    public static HttpRequestMessage Post(string path, string? key, string body, params (string Name, string Value)[] headers)
    {
        var request = new HttpRequestMessage(HttpMethod.Post, path) { Content = new StringContent(body, Encoding.UTF8, "application/json") };
        if (key is not null)
        {
            request.Headers.TryAddWithoutValidation("Idempotency-Key", key);
        }

        foreach (var (name, value) in headers)
        {
            request.Headers.TryAddWithoutValidation(name, value);
        }

        return request;
    }

    public static async Task<(HttpResponseMessage Response, byte[] Body)> SendAsync(this HttpClient client, string path, string? key, string body, params (string Name, string Value)[] headers)
    {
        using var request = Post(path, key, body, headers);
        var response = await client.SendAsync(request);
        return (response, await response.Content.ReadAsByteArrayAsync());
    }

    public static bool IsReplay(this HttpResponseMessage response) =>
        response.Headers.TryGetValues("Idempotent-Replayed", out var values) && values.Single() == "true";

    public static MediaTypeHeaderValue? ContentType(this HttpResponseMessage response) => response.Content.Headers.ContentType;
}
